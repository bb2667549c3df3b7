"""Checkpoints load as remote code in a fresh process where `import pmoe` fails."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from helpers import REMOTE_CODE_FILES, make_pmoe, padded_batch, randomize_experts


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["pmoe"] = None  # this process must not see the installed package
    try:
        import pmoe  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("pmoe is importable in the child process")

    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    source, data_file = sys.argv[1], sys.argv[2]
    data = load_file(data_file)
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    classifier = AutoModelForSequenceClassification.from_pretrained(source, trust_remote_code=True, num_labels=3)
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
        hidden = base(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
        generated = model.generate(
            input_ids=data["input_ids"], attention_mask=data["attention_mask"],
            max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
        )
    print(json.dumps({
        "config_class": type(config).__module__ + "." + type(config).__name__,
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "base_class": type(base).__name__,
        "classifier_class": type(classifier).__name__,
        "classifier_logits_shape": list(classifier(input_ids=data["input_ids"],
                                                   attention_mask=data["attention_mask"]).logits.shape),
        "num_experts": model.config.num_experts,
        "expert_tasks": model.config.expert_tasks,
        "expert_tensors": sum(1 for name, _ in model.named_parameters() if ".experts." in name),
        "logits_identical": bool(torch.equal(logits, data["logits"])),
        "hidden_identical": bool(torch.equal(hidden, data["hidden"])),
        "generated": generated.tolist(),
    }))
    """
)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    model = make_pmoe(router_top_k=1)
    model.add_expert("sql")
    model.add_expert("chat")
    randomize_experts(model)
    model.save_pretrained(root / "checkpoint")
    input_ids, attention_mask = padded_batch(batch=2, length=6, side="left")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        generated = model.generate(
            input_ids=input_ids, attention_mask=attention_mask,
            max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0,
        )
    save_file(
        {"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits, "hidden": hidden},
        root / "data.safetensors",
    )
    expert_tensors = sum(1 for name, _ in model.named_parameters() if ".experts." in name)
    return root, generated.tolist(), expert_tensors


def run_child(source, root, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(root / "modules"), **(extra_env or {}))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(root / "data.safetensors")],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check(report, generated, expert_tensors):
    assert report["model_class"].startswith("transformers_modules.")
    assert report["model_class"].endswith("modeling_pmoe.PMoEForCausalLM")
    assert report["config_class"].endswith("configuration_pmoe.PMoEConfig")
    assert report["base_class"] == "PMoEModel"
    assert report["classifier_class"] == "PMoEForSequenceClassification"
    assert report["classifier_logits_shape"] == [2, 3]
    assert report["num_experts"] == 2
    assert report["expert_tasks"] == ["sql", "chat"]
    assert report["expert_tensors"] == expert_tensors
    assert report["logits_identical"]
    assert report["hidden_identical"]
    assert report["generated"] == generated


def test_checkpoint_folder_layout(saved_checkpoint):
    root, _, _ = saved_checkpoint
    folder = root / "checkpoint"
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", *REMOTE_CODE_FILES} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_pmoe.PMoEConfig",
        "AutoModel": "modeling_pmoe.PMoEModel",
        "AutoModelForCausalLM": "modeling_pmoe.PMoEForCausalLM",
        "AutoModelForSequenceClassification": "modeling_pmoe.PMoEForSequenceClassification",
    }
    assert config["num_experts"] == 2 and config["expert_tasks"] == ["sql", "chat"]


def test_remote_code_files_import_only_torch_and_transformers(saved_checkpoint):
    root, _, _ = saved_checkpoint
    from transformers.dynamic_module_utils import get_imports

    for name in REMOTE_CODE_FILES:
        imports = set(get_imports(root / "checkpoint" / name)) - set(sys.stdlib_module_names)
        assert imports <= {"torch", "transformers"}, (name, imports)


def test_fresh_process_loads_the_folder_without_pmoe(saved_checkpoint):
    root, generated, expert_tensors = saved_checkpoint
    check(run_child(root / "checkpoint", root), generated, expert_tensors)


def test_fresh_process_loads_by_repo_id_from_an_offline_hub_cache(saved_checkpoint, tmp_path):
    root, generated, expert_tensors = saved_checkpoint
    # The layout huggingface_hub writes: models--{org}--{name}/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--pmoe-test--tiny-pmoe"
    shutil.copytree(root / "checkpoint", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    report = run_child("pmoe-test/tiny-pmoe", root, {"HF_HUB_CACHE": str(tmp_path / "hub")})
    check(report, generated, expert_tensors)
