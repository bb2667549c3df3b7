"""Bad checkpoints give a clear error, never a half-loaded model.

"Never half-loaded" means the call raises and returns nothing. transformers alone only warns about weights missing
from a checkpoint and initialises them at random; for a PMoE model that would silently lose experts, so
`PMoEPreTrainedModel.from_pretrained` checks what transformers reports and raises instead.

Limitation, tested below: safetensors has no checksum. A truncated file or a corrupted header is detected (the header
must describe exactly the bytes of the file), but bytes changed inside the tensor data load without any error.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import pmoe
from pmoe import PMoEForCausalLM

from helpers import make_pmoe, padded_batch, randomize_experts


TASKS = ["sql", "chat"]
RANK = 4  # helpers.tiny_pmoe_config's
CORRUPT = "truncated or its header is corrupted"
MISMATCH = r"the weights do not match config\.json"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = make_pmoe(num_experts=2, expert_tasks=TASKS)
    randomize_experts(model)
    folder = tmp_path_factory.mktemp("good") / "checkpoint"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture
def checkpoint(saved, tmp_path):
    """A fresh copy of a good checkpoint (2 experts), for a test to break."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved[0], folder)
    return folder


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


LOADERS = {
    "PMoEForCausalLM": PMoEForCausalLM.from_pretrained,
    "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
}


# ------------------------------------------------------------------------------------------- the good case
def test_a_good_checkpoint_loads_completely(saved):
    folder, model = saved
    loaded, info = PMoEForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert isinstance(loaded, PMoEForCausalLM)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                           model(input_ids=input_ids, attention_mask=attention_mask).logits)
    assert isinstance(AutoModelForCausalLM.from_pretrained(folder), PMoEForCausalLM)


def test_legitimate_partial_loads_still_work(saved, tmp_path):
    """What is not a bad checkpoint: a new classification head on a causal LM checkpoint, the base model of a causal
    LM checkpoint, and tied embeddings (lm_head is not saved)."""
    folder, _ = saved
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=3, output_loading_info=True
    )
    assert isinstance(classifier, pmoe.PMoEForSequenceClassification)
    assert info["missing_keys"] == {"score.weight"}
    assert isinstance(AutoModel.from_pretrained(folder), pmoe.PMoEModel)

    tied = make_pmoe(num_experts=1, expert_tasks=["a"], tie_word_embeddings=True)
    tied.save_pretrained(tmp_path / "tied")
    loaded, info = PMoEForCausalLM.from_pretrained(tmp_path / "tied", output_loading_info=True)
    assert info["missing_keys"] == set()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    # A head of another size is re-initialised only when the caller asks for it, as in transformers.
    classifier.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match=r"score\.weight has shape \[3, 32\] in the weights but \[5, 32\] .*"
                                         r"Likely cause: the head was saved with another size .*"
                                         r"pass ignore_mismatched_sizes=True to start a new head"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "classifier", num_labels=5)
    _, info = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "classifier", num_labels=5, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert {key for key, _, _ in info["mismatched_keys"]} == {"score.weight"}


# ------------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_weights_file(checkpoint, loader):
    path = checkpoint / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=f"cannot be read: a .safetensors file is {CORRUPT}"):
        LOADERS[loader](checkpoint)


def test_weights_file_cut_inside_the_header(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(OSError, match=CORRUPT):
        PMoEForCausalLM.from_pretrained(checkpoint)


@pytest.mark.parametrize("where", ["header length", "header text"])
def test_corrupted_header(checkpoint, where):
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    if where == "header length":  # the first 8 bytes: little-endian length of the JSON header
        data[:8] = (10**12).to_bytes(8, "little")
    else:
        data[10:30] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(OSError, match=r"The weights of .* cannot be read: a \.safetensors file is truncated or its "
                                      r"header is corrupted \(Error while deserializing header"):
        PMoEForCausalLM.from_pretrained(checkpoint)


def test_corrupted_tensor_data_is_not_detected(checkpoint, saved):
    """Documents the limit: safetensors stores no checksum, so changed data bytes load silently. Compare the files'
    hashes (the Hub lists a sha256 per LFS file) to detect this."""
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")  # layout: 8-byte length, JSON header, then the data
    header = json.loads(data[8 : 8 + header_length])
    name = "model.layers.3.mlp.down_proj.experts.1.lora_B"
    start = 8 + header_length + header[name]["data_offsets"][0]
    data[start : start + 16] = b"\x7f" * 16  # four float32 values of 3.4e38
    path.write_bytes(bytes(data))
    loaded = PMoEForCausalLM.from_pretrained(checkpoint)
    original = saved[1].state_dict()
    changed = [key for key, tensor in loaded.state_dict().items() if not torch.equal(tensor, original[key])]
    assert changed == [name]


# ------------------------------------------------------------------------------------------- config vs tensors
@pytest.mark.parametrize("loader", LOADERS)
def test_config_lists_more_experts_than_were_saved(checkpoint, loader):
    edit_config(checkpoint, num_experts=3, expert_tasks=[*TASKS, "extra"], expert_train_steps=[0, 0, 0])
    with pytest.raises(ValueError, match=MISMATCH) as error:
        LOADERS[loader](checkpoint)
    message = str(error.value)
    assert "num_experts=3, expert_tasks=['sql', 'chat', 'extra']" in message
    assert ("- expert 2 ('extra') is in config.json but none of its 67 tensors is in the weights (e.g. "
            "model.embed_tokens.experts.2.lora_A") in message
    assert "config.json lists more experts than were saved." in message
    assert ("model.first_layer_screen_router.usage has shape [2] in the weights but [3] in a model built from "
            "config.json; model.routers.0.usage has shape [2] in the weights but [3] in a model built from "
            "config.json; and 1 more tensor(s) like them. Likely cause: the saved routers count 2 experts but "
            "config.num_experts is 3") in message
    assert "Nothing is returned" in message and "Fix config.json" in message


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_config_lists_fewer_experts_than_were_saved(checkpoint, ignore_mismatched_sizes):
    edit_config(checkpoint, num_experts=1, expert_tasks=TASKS[:1], expert_train_steps=[0])
    # ignore_mismatched_sizes never lets expert or router tensors be re-initialised.
    with pytest.raises(ValueError, match=MISMATCH) as error:
        PMoEForCausalLM.from_pretrained(checkpoint, ignore_mismatched_sizes=ignore_mismatched_sizes)
    message = str(error.value)
    assert "num_experts=1, expert_tasks=['sql']" in message
    assert ("- the weights hold 67 tensor(s) of expert(s) [1] that a model built from config.json does not have: "
            "model.embed_tokens.experts.1.lora_A") in message
    assert "config.json lists fewer experts than were saved." in message
    assert "model.routers.0.usage has shape [2] in the weights but [1]" in message


def test_a_missing_expert_tensor(checkpoint):
    missing = "model.layers.3.mlp.down_proj.experts.1.lora_B"
    edit_weights(checkpoint, lambda tensors: tensors.pop(missing))
    with pytest.raises(ValueError, match=MISMATCH + r".*\n- 1 of the 67 tensors of expert 1 \('chat'\) are missing "
                                         r"from the weights: model\.layers\.3\.mlp\.down_proj\.experts\.1\.lora_B\. "
                                         r"The weights file is incomplete"):
        PMoEForCausalLM.from_pretrained(checkpoint)
    # The caller asking for the loading info does not get a half-loaded model either.
    with pytest.raises(ValueError, match=MISMATCH):
        PMoEForCausalLM.from_pretrained(checkpoint, output_loading_info=True)


def test_a_missing_router_statistic(checkpoint):
    edit_weights(checkpoint, lambda tensors: tensors.pop("model.routers.0.experts.0.count"))
    with pytest.raises(ValueError, match=r"1 of the 67 tensors of expert 0 \('sql'\) are missing from the weights: "
                                         r"model\.routers\.0\.experts\.0\.count"):
        PMoEForCausalLM.from_pretrained(checkpoint)


def test_a_missing_base_weight(checkpoint):
    edit_weights(checkpoint, lambda tensors: tensors.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"\n- 1 tensor\(s\) are missing from the weights: model\.norm\.weight\."):
        PMoEForCausalLM.from_pretrained(checkpoint)


def test_router_usage_may_be_missing(checkpoint):
    """Checkpoints from before expert merging have no `usage` counts: they load with zero counts, as a fresh model."""
    edit_weights(checkpoint, lambda tensors: tensors.pop("model.routers.0.usage"))
    model = PMoEForCausalLM.from_pretrained(checkpoint)
    assert torch.count_nonzero(model.expert_usage()) == 0


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_expert_rank_edited_in_the_config(checkpoint, ignore_mismatched_sizes):
    edit_config(checkpoint, expert_rank=2)
    with pytest.raises(ValueError, match=MISMATCH) as error:
        PMoEForCausalLM.from_pretrained(checkpoint, ignore_mismatched_sizes=ignore_mismatched_sizes)
    message = str(error.value)
    assert ("- model.embed_tokens.experts.0.lora_A has shape [4, 97] in the weights but [2, 97] in a model "
            "built from config.json; model.embed_tokens.experts.0.lora_B has shape [32, 4] in the weights "
            "but [32, 2] in a model built from config.json; and 114 more tensor(s) like them. Likely cause: the saved "
            "experts have rank 4 but config.expert_rank is 2: expert_rank in config.json was changed.") in message


def test_one_expert_tensor_saved_with_another_rank(checkpoint):
    name = "model.layers.2.self_attn.q_proj.experts.0.lora_A"
    edit_weights(checkpoint, lambda tensors: tensors.__setitem__(name, torch.zeros(3, 32)))
    with pytest.raises(ValueError, match=rf"- {name} has shape \[3, 32\] in the weights but \[{RANK}, 32\] in a model "
                                         rf"built from config\.json\. Likely cause: the saved experts have rank 3 "
                                         rf"but config\.expert_rank is {RANK}"):
        PMoEForCausalLM.from_pretrained(checkpoint)


def test_model_sizes_edited_in_the_config(checkpoint):
    edit_config(checkpoint, intermediate_size=64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.experts\.0\.lora_A has shape \[4, 48\] "
                                         r"in the weights but \[4, 64\] .*Likely cause: the model sizes in "
                                         r"config\.json"):
        PMoEForCausalLM.from_pretrained(checkpoint)


def test_fewer_layers_in_the_config(checkpoint):
    edit_config(checkpoint, num_hidden_layers=3, layer_types=["full_attention"] * 3)
    with pytest.raises(ValueError, match=r"the weights hold \d+ tensor\(s\) of expert\(s\) \[0, 1\] that a model "
                                         r"built from config\.json does not have: model\.layers\.3\..*config\.json "
                                         r"builds these experts elsewhere"):
        PMoEForCausalLM.from_pretrained(checkpoint)


# ------------------------------------------------------------------------------------------- config errors
NEWER = r"PMoEConfig\.pmoe_format_version is 2, but this pmoe reads checkpoint format versions up to 1: the " \
        r"checkpoint was made by a newer pmoe\. Upgrade pmoe"


@pytest.mark.parametrize("loader", [*LOADERS, "AutoConfig"])
def test_checkpoint_from_a_newer_pmoe(checkpoint, loader):
    assert pmoe.PMOE_FORMAT_VERSION == 1
    edit_config(checkpoint, pmoe_format_version=pmoe.PMOE_FORMAT_VERSION + 1)
    load = AutoConfig.from_pretrained if loader == "AutoConfig" else LOADERS[loader]
    with pytest.raises(ValueError, match=NEWER):
        load(checkpoint)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(expert_tasks=["sql"]),
         r"PMoEConfig\.expert_tasks must be a list of num_experts=2 non-empty task names, got \['sql'\]"),
        (dict(expert_tasks=["sql", "sql"]), r"PMoEConfig\.expert_tasks must be a list of distinct task names"),
        (dict(expert_tasks=["sql", ""]), r"PMoEConfig\.expert_tasks must be a list of num_experts=2 non-empty"),
        (dict(expert_tasks="sc"), r"PMoEConfig\.expert_tasks must be a list, got the string 'sc'"),
        (dict(expert_train_steps=[5]),
         r"PMoEConfig\.expert_train_steps must be a list of num_experts=2 integers >= 0, got \[5\]"),
        (dict(expert_train_steps=[5, -1]), r"PMoEConfig\.expert_train_steps must be a list of num_experts=2"),
        (dict(num_experts=-1), r"PMoEConfig\.num_experts must be an integer >= 0"),
        (dict(num_experts="2"), r"PMoEConfig\.num_experts must be an integer >= 0, got '2'"),
    ],
    ids=["tasks-too-few", "tasks-duplicate", "tasks-empty-name", "tasks-string", "steps-too-few",
         "steps-negative", "experts-negative", "experts-string"],
)
@pytest.mark.parametrize("loader", LOADERS)
def test_inconsistent_expert_fields_in_config_json(checkpoint, changes, message, loader):
    edit_config(checkpoint, **changes)
    with pytest.raises(ValueError, match=message):
        LOADERS[loader](checkpoint)


# ------------------------------------------------------------------------------------------- the CLI
def test_pmoe_info_reports_bad_checkpoints_in_one_line(checkpoint, tmp_path, capsys):
    from pmoe.cli import main

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint, truncated)
    path = truncated / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    assert main(["info", str(truncated)]) == 1
    assert (f"pmoe info: error: {truncated}: model.safetensors is truncated or its header is corrupted (Error while "
            "deserializing header") in capsys.readouterr().err

    edit_config(checkpoint, num_experts=3, expert_tasks=[*TASKS, "extra"], expert_train_steps=[0, 0, 0])
    assert main(["info", str(checkpoint)]) == 1
    assert (f"pmoe info: error: {checkpoint}: model.routers.0.usage has shape [2] in the weights but [3] in a model "
            "built from config.json (num_experts=3, expert_tasks=['sql', 'chat', 'extra']): config.json does not "
            "match the weights") in capsys.readouterr().err
