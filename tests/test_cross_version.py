"""Checkpoints travel across the supported transformers releases, both ways.

A checkpoint saved here loads as remote code, in a process without pmoe, under the other end of the tested range
(`PMOE_OTHER_PYTHON`: a Python whose environment has another supported transformers; `bash .ci/run` builds one at each
end of the range and points each run at the other), gives bit-identical logits and the same greedy tokens with
dynamic and static caches; the copy that process saves (written by the other transformers) loads back here the same.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from pmoe.configuration_pmoe import PMOE_VERSION

from helpers import make_pmoe, padded_batch, randomize_experts


OTHER_PYTHON = os.environ.get("PMOE_OTHER_PYTHON")
if not OTHER_PYTHON:
    if os.environ.get("PMOE_REQUIRE_OTHER_PYTHON") == "1":
        raise RuntimeError("PMOE_REQUIRE_OTHER_PYTHON=1 but PMOE_OTHER_PYTHON is not set")
    pytest.skip(
        "set PMOE_OTHER_PYTHON to a Python with another supported transformers release (bash .ci/run does)",
        allow_module_level=True,
    )

CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["pmoe"] = None  # this process must not see the installed package
    import torch, transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    checkpoint, inputs_file, results_file = sys.argv[1:4]
    save_to = sys.argv[4] if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    data = load_file(inputs_file)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        results = {
            "logits": model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits,
            "dynamic": model.generate(input_ids=data["input_ids"], attention_mask=data["attention_mask"], **greedy),
            "static": model.generate(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                                     cache_implementation="static", **greedy),
        }
    save_file({name: tensor.contiguous() for name, tensor in results.items()}, results_file)
    if save_to:
        model.save_pretrained(save_to)
    print(json.dumps({"transformers": transformers.__version__, "experts": model.config.expert_tasks}))
    """
)


def run_child(python, *args):
    result = subprocess.run(
        [python, "-c", CHILD, *map(str, args)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_checkpoints_load_bit_identically_under_the_other_transformers(tmp_path):
    model = make_pmoe(expert_layers="all", router_top_k=2)
    for task in ("sql", "chat", "code"):
        model.add_expert(task)
    randomize_experts(model)
    model.save_pretrained(tmp_path / "saved-here")
    input_ids, attention_mask = padded_batch(batch=3, length=7, side="left")
    save_file({"input_ids": input_ids, "attention_mask": attention_mask}, tmp_path / "inputs.safetensors")

    here = run_child(sys.executable, tmp_path / "saved-here", tmp_path / "inputs.safetensors", tmp_path / "here.st")
    there = run_child(OTHER_PYTHON, tmp_path / "saved-here", tmp_path / "inputs.safetensors", tmp_path / "there.st",
                      tmp_path / "saved-there")
    assert here["transformers"] == transformers.__version__ and there["transformers"] != here["transformers"]
    assert there["experts"] == ["sql", "chat", "code"]
    written = json.loads((tmp_path / "saved-there" / "config.json").read_text())
    assert written["transformers_version"] == there["transformers"] and written["pmoe_version"] == PMOE_VERSION

    back = run_child(sys.executable, tmp_path / "saved-there", tmp_path / "inputs.safetensors", tmp_path / "back.st")
    assert back["experts"] == ["sql", "chat", "code"]
    expected = load_file(tmp_path / "here.st")
    for name in ("there.st", "back.st"):
        got = load_file(tmp_path / name)
        for key in ("logits", "dynamic", "static"):
            assert torch.equal(got[key], expected[key]), (name, key)
    assert torch.equal(expected["dynamic"], expected["static"])
