"""Checkpoints saved by an older pmoe load with the outputs that version computed.

`tests/fixtures/checkpoints/` holds small checkpoints written by `tests/fixtures/make_checkpoints.py` at the commit
named in each `made_by.json`, with that version's logits (a left-padded batch, routed by the model and with given gates
that mix experts) and greedy tokens. Refactors must keep them bit-identical: same keys, same config fields, same math.
Bits also depend on the CPU's kernels, so the exact comparison is against the outputs that version computed on a
machine like this one (`outputs_by_machine`); where it has none, within float32 rounding, as across torch versions.
"""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import pmoe
from helpers import numerics_machine_key

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "checkpoints")
VARIANTS = sorted(os.listdir(FIXTURES))


def same_torch_minor(made_by: dict) -> bool:
    return torch.__version__.split(".")[:2] == made_by["torch"].split(".")[:2]


def test_the_fixtures_cover_the_default_and_the_papers_layout():
    assert {"default", "deep-token-learned"} <= set(VARIANTS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("loader", [pmoe.PMoEForCausalLM, AutoModelForCausalLM])
def test_an_old_checkpoint_loads_with_the_outputs_it_had(variant, loader):
    folder = os.path.join(FIXTURES, variant)
    with open(os.path.join(folder, "made_by.json")) as f:
        made_by = json.load(f)
    this_machine = made_by.get("outputs_by_machine", {}).get(numerics_machine_key())
    # Same kernels (a machine like this one, the same torch minor): the same math gives the same bits.
    exact = this_machine is not None and same_torch_minor(this_machine)
    if not exact:
        warnings.warn(f"{variant}: no outputs of pmoe {made_by['pmoe_commit']} computed on a machine like this one "
                      "with this torch: compared within float32 rounding, not bit for bit (make_checkpoints.py "
                      "--add-machine adds them)")
    expected = load_file(os.path.join(folder, this_machine["file"] if this_machine else "expected_outputs.safetensors"))
    model = loader.from_pretrained(folder).eval()
    assert isinstance(model, pmoe.PMoEForCausalLM)
    inputs = dict(input_ids=expected["input_ids"], attention_mask=expected["attention_mask"])
    with torch.no_grad():
        outputs = {"logits": model(**inputs).logits,
                   "generated": model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)}
        if "routing_weights" in expected:
            outputs["logits_given_gates"] = model(**inputs, routing_weights=expected["routing_weights"]).logits
    assert torch.equal(outputs["generated"], expected["generated"])
    for name in [name for name in outputs if name.startswith("logits")]:
        if exact:
            assert torch.equal(outputs[name], expected[name]), f"{variant}: {name} changed"
        else:  # another torch or CPU may round differently; the math must still agree
            torch.testing.assert_close(outputs[name], expected[name], rtol=1e-5, atol=1e-5)
