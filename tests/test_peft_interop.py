"""PEFT interop: one PMoE expert <-> one PEFT LoRA adapter of the dense base model, and PEFT LoRA on a PMoE model."""

import copy
import json

import pytest
import torch

import peft  # noqa: E402  (a test extra: a missing one must fail, not skip)
from safetensors.torch import load_file, save_file

import pmoe
from pmoe import PMoEForCausalLM, export_expert_to_peft, import_peft_adapter

from helpers import make_dense, padded_batch, randomize_experts


CONFIG_FIELDS = ("peft_type", "task_type", "r", "lora_alpha", "use_rslora", "lora_dropout", "bias", "layers_pattern",
                 "layers_to_transform", "fan_in_fan_out", "use_dora", "modules_to_save")


def converted(dense, **options):
    # The deep layout, so that adapters on shallow layers are a case to refuse (expert_layers="all" is tested too).
    options = {"num_shallow_layers": 2, "expert_rank": 4, "expert_layers": "deep", **options}
    return PMoEForCausalLM.from_dense(copy.deepcopy(dense), **options).eval()


def forced(model, expert, batch):
    """Logits with the sequence gate forced one-hot onto `expert`."""
    input_ids, attention_mask = batch
    weights = torch.zeros(input_ids.shape[0], model.config.num_experts)
    weights[:, expert] = 1.0
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, routing_weights=weights).logits


def peft_logits(dense, adapter_path, batch):
    input_ids, attention_mask = batch
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(dense), adapter_path).eval()
    with torch.no_grad():
        return peft_model(input_ids=input_ids, attention_mask=attention_mask).logits


def save_peft_adapter(dense, path, seed=3, **lora_options):
    """A LoRA adapter made by PEFT itself on (a copy of) the dense model, with random A and B as after training."""
    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"],
               "layers_to_transform": [2, 3], "layers_pattern": "layers", "task_type": "CAUSAL_LM", **lora_options}
    peft_model = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(path)
    return path


def read_adapter(path):
    with open(path / "adapter_config.json") as handle:
        config = json.load(handle)
    return config, load_file(path / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("options", [{}, {"expert_layers": "all"}])
def test_exported_expert_on_the_dense_model_matches_forced_routing_exactly(tmp_path, family, options):
    dense = make_dense(family)
    model = converted(dense, **options)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    batch = padded_batch()
    for expert in (0, 1):
        export_expert_to_peft(model, expert, tmp_path / str(expert))
        # Bit-exact: the dense and PMoE layers run the same kernels, and the default scaling alpha / r = 2 is a power
        # of two, so applying it before B (PMoE: B @ (2 h)) or after (PEFT: (B @ h) * 2) rounds identically.
        assert torch.equal(peft_logits(dense, tmp_path / str(expert), batch), forced(model, expert, batch))
    # The two experts differ, so the comparison is not trivially about the base model.
    assert not torch.equal(forced(model, 0, batch), forced(model, 1, batch))


def test_exported_expert_with_non_power_of_two_scaling_matches_to_rounding(tmp_path):
    dense = make_dense("mistral")
    model = converted(dense, expert_rank=3, expert_alpha=5.0, expert_target_modules=["q_proj", "down_proj"])
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    export_expert_to_peft(model, 1, tmp_path)
    batch = padded_batch()
    # Not bit-exact: PMoE multiplies the rank-r hidden by scaling = 5/3 before the B matmul (the gates and scaling are
    # folded into one per-rank factor), PEFT multiplies the output after it; 5/3 is not a power of two, so the two
    # orders round differently (a few 1e-8 on these logits).
    torch.testing.assert_close(peft_logits(dense, tmp_path, batch), forced(model, 1, batch), atol=1e-6, rtol=0)


def test_export_writes_what_peft_writes(tmp_path):
    dense = make_dense("llama")
    model = converted(dense, expert_target_modules=["q_proj", "v_proj", "down_proj"], expert_dropout=0.1)
    model.add_expert("a")
    export_expert_to_peft(model, 0, tmp_path / "ours", base_model_name_or_path="org/tiny-llama")
    reference = peft.get_peft_model(copy.deepcopy(dense), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[2, 3], layers_pattern="layers", task_type="CAUSAL_LM",
    ))
    reference.save_pretrained(tmp_path / "peft")

    ours_config, ours = read_adapter(tmp_path / "ours")
    peft_config, theirs = read_adapter(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs)
    assert "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight" in ours
    for key, tensor in ours.items():
        assert tensor.shape == theirs[key].shape and tensor.dtype == theirs[key].dtype, key
    for field in CONFIG_FIELDS:
        assert ours_config[field] == peft_config[field], field
    assert sorted(ours_config["target_modules"]) == sorted(peft_config["target_modules"])
    assert ours_config["base_model_name_or_path"] == "org/tiny-llama"

    with pytest.raises(IndexError, match="out of range"):
        export_expert_to_peft(model, 1, tmp_path / "bad")


# ------------------------------------------------------------------------------------------------------------ import
def test_peft_trained_adapter_imports_as_an_expert_with_the_same_logits(tmp_path):
    dense = make_dense("qwen2")
    adapter = save_peft_adapter(dense, tmp_path / "adapter")
    model = converted(dense)
    model.add_expert("old")
    randomize_experts(model)
    index = import_peft_adapter(model, adapter, "imported")
    assert index == 1 and model.config.expert_tasks == ["old", "imported"]
    assert model.training_expert == 1
    batch = padded_batch()
    # Same rank and alpha: the tensors are copied as they are, and alpha / r = 2 makes the result bit-exact.
    assert torch.equal(forced(model, 1, batch), peft_logits(dense, adapter, batch))
    # Projections the adapter does not target have no update.
    for name, linear in [("k_proj", model.model.layers[2].self_attn.k_proj), ("down_proj", model.model.layers[3].mlp.down_proj)]:
        assert not linear.experts[1].lora_B.any(), name


def test_lower_rank_and_other_alpha_are_padded_and_rescaled(tmp_path):
    dense = make_dense("llama")
    adapter = save_peft_adapter(
        dense, tmp_path / "adapter", r=3, lora_alpha=7, rank_pattern={"q_proj": 2}, alpha_pattern={"up_proj": 5},
    )
    model = converted(dense)
    model.add_expert("old")
    import_peft_adapter(model, adapter, "imported")
    linear = model.model.layers[2].self_attn.q_proj.experts[1]
    assert not linear.lora_A[2:].any() and not linear.lora_B[:, 2:].any()  # rank 2 zero-padded to 4
    batch = padded_batch()
    # B is rescaled by (alpha_a / r_a) / (alpha / r) per module, which rounds: equal up to float rounding.
    torch.testing.assert_close(forced(model, 1, batch), peft_logits(dense, adapter, batch), atol=1e-6, rtol=0)


def test_import_then_export_round_trips_exactly(tmp_path):
    dense = make_dense("llama")
    adapter = save_peft_adapter(
        dense, tmp_path / "adapter", target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"],
    )
    model = converted(dense)
    index = import_peft_adapter(model, adapter, "imported")
    export_expert_to_peft(model, index, tmp_path / "exported")

    original_config, original = read_adapter(adapter)
    exported_config, exported = read_adapter(tmp_path / "exported")
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    for field in CONFIG_FIELDS:
        assert exported_config[field] == original_config[field], field
    assert sorted(exported_config["target_modules"]) == sorted(original_config["target_modules"])

    # And the other way: an exported expert imported again is the same expert, tensor for tensor.
    randomize_experts(model)
    export_expert_to_peft(model, index, tmp_path / "again")
    copy_index = import_peft_adapter(model, tmp_path / "again", "copy")
    for linear in model.expert_linears():
        assert torch.equal(linear.experts[copy_index].lora_A, linear.experts[index].lora_A)
        assert torch.equal(linear.experts[copy_index].lora_B, linear.experts[index].lora_B)


def test_embedding_lora_round_trips_through_embedding_experts(tmp_path):
    dense = make_dense("llama")
    adapter = save_peft_adapter(dense, tmp_path / "adapter", target_modules=["embed_tokens", "q_proj"],
                                layers_to_transform=None, layers_pattern=None)
    model = converted(dense, expert_layers="all")  # the default targets: seven projections and embed_tokens
    model.add_expert("old")
    randomize_experts(model)
    index = import_peft_adapter(model, adapter, "imported")
    batch = padded_batch()
    assert torch.equal(forced(model, index, batch), peft_logits(dense, adapter, batch))
    export_expert_to_peft(model, index, tmp_path / "exported")
    config, tensors = read_adapter(tmp_path / "exported")
    _, theirs = read_adapter(adapter)
    # PEFT also saves the unchanged base embedding (save_embedding_layers="auto"); the export leaves it out, and
    # writes every targeted projection (zero B where the adapter had none).
    assert "base_model.model.model.embed_tokens.base_layer.weight" not in tensors
    assert set(theirs) - set(tensors) == {"base_model.model.model.embed_tokens.base_layer.weight"}
    assert all(torch.equal(tensors[key], theirs[key]) for key in ("base_model.model.model.embed_tokens.lora_embedding_A",
                                                                "base_model.model.model.embed_tokens.lora_embedding_B"))
    assert "embed_tokens" in config["target_modules"]
    assert torch.equal(peft_logits(dense, tmp_path / "exported", batch), forced(model, index, batch))


def test_an_adapter_whose_base_embedding_differs_is_refused(tmp_path):
    dense = make_dense("llama")
    adapter = save_peft_adapter(dense, tmp_path / "adapter", target_modules=["embed_tokens"],
                                layers_to_transform=None, layers_pattern=None)
    config, tensors = read_adapter(adapter)
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] += 0.5
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    model = converted(dense, expert_layers="all")
    with pytest.raises(ValueError, match="differs from this model's token embedding"):
        import_peft_adapter(model, adapter, "imported")
    assert model.config.num_experts == 0


INCOMPATIBLE = {
    "not LoRA": (lambda dense, path: peft.get_peft_model(copy.deepcopy(dense), peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM",
    )).save_pretrained(path), "peft_type is 'IA3'"),
    "rank above expert_rank": (lambda dense, path: save_peft_adapter(dense, path, r=8), r"rank 8 > config.expert_rank=4"),
    "target outside expert_target_modules": (
        lambda dense, path: save_peft_adapter(dense, path, target_modules=["q_proj", "o_proj"]),
        r"'o_proj' is not in config.expert_target_modules",
    ),
    "shallow layer": (
        lambda dense, path: save_peft_adapter(dense, path, layers_to_transform=None, layers_pattern=None),
        r"layer 0 has no experts",
    ),
    "DoRA": (lambda dense, path: save_peft_adapter(dense, path, use_dora=True), "DoRA"),
    "bias": (lambda dense, path: save_peft_adapter(dense, path, bias="lora_only"), "bias='lora_only'"),
    "modules_to_save": (lambda dense, path: save_peft_adapter(dense, path, modules_to_save=["lm_head"]),
                        "modules_to_save"),
    "embedding target": (lambda dense, path: save_peft_adapter(
        dense, path, target_modules=["embed_tokens", "q_proj"], layers_to_transform=None, layers_pattern=None,
    ), "embedding / LM-head LoRA is not representable"),
    "LoRA bias": (lambda dense, path: save_peft_adapter(dense, path, lora_bias=True), "lora_bias=True"),
    "other base model": (lambda dense, path: save_peft_adapter(make_dense("mistral"), path),
                         "was it trained on another base model"),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_incompatible_adapters_are_refused_before_growing(tmp_path, case):
    make_adapter, message = INCOMPATIBLE[case]
    dense = make_dense("llama")
    make_adapter(dense, tmp_path / "adapter")
    model = converted(dense, expert_target_modules=["q_proj", "v_proj", "up_proj"])
    model.add_expert("old")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        import_peft_adapter(model, tmp_path / "adapter", "imported")
    assert model.config.num_experts == 1 and model.config.expert_tasks == ["old"]
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_import_refuses_a_taken_task_name_and_a_missing_folder(tmp_path):
    dense = make_dense("llama")
    model = converted(dense)
    model.add_expert("old")
    adapter = save_peft_adapter(dense, tmp_path / "adapter")
    with pytest.raises(ValueError, match="already has expert 0"):
        import_peft_adapter(model, adapter, "old")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft_adapter(model, tmp_path / "nothing", "new")
    # A tensor PEFT's LoRA would not write (here a stray lm_head weight) is named in the error.
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.weight"] = torch.zeros(3)
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="base_model.model.lm_head.weight"):
        import_peft_adapter(model, adapter, "new")
    assert model.config.num_experts == 1


def test_pickle_adapter_weights_are_refused_before_growing(tmp_path):
    dense = make_dense("llama")
    adapter = save_peft_adapter(dense, tmp_path / "adapter")
    # The same adapter as older PEFT (or safe_serialization=False) writes it: adapter_model.bin, a pickle.
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    model = converted(dense)
    model.add_expert("old")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    message = (r"adapter_model\.bin'?, a pickle file: pmoe loads adapter weights only from adapter_model\.safetensors, "
               r"because unpickling can run code\. .*PeftModel\.from_pretrained.*save_pretrained")
    with pytest.raises(ValueError, match=message):
        import_peft_adapter(model, adapter, "imported")
    assert model.config.num_experts == 1 and model.config.expert_tasks == ["old"]
    assert model.training_expert == 0
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    # With the safetensors file next to it (as PEFT converts it), the pickle is ignored and the import works.
    save_file(torch.load(adapter / "adapter_model.bin", weights_only=True), adapter / "adapter_model.safetensors")
    assert import_peft_adapter(model, adapter, "imported") == 1


# ------------------------------------------------------------------------------------------------- PEFT on a PMoE model
def test_peft_lora_on_a_pmoe_model_trains_only_its_own_params_and_keeps_the_gates(tmp_path):
    dense = make_dense("llama")
    model = converted(dense)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    batch = padded_batch()
    expected = {expert: forced(model, expert, batch) for expert in (0, 1)}
    with torch.no_grad():
        expected_routed = model(input_ids=batch[0], attention_mask=batch[1]).logits

    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
    ))
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A.default." in name or ".lora_B.default." in name for name in trainable)
    # PMoE's own experts (also named lora_A / lora_B) are frozen and are not part of PEFT's adapter.
    assert not any(".experts." in name for name in trainable)
    wrapped = peft_model.base_model.model.model.layers[2].self_attn.q_proj
    assert isinstance(wrapped.base_layer, pmoe.PMoELinear) and len(wrapped.base_layer.experts) == 2

    # LoRA B starts at zero: the PEFT model is the PMoE model, routed or forced (the gates reach the wrapped
    # PMoELinear through PEFT's `base_layer(x, *args, **kwargs)`).
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=batch[0], attention_mask=batch[1]).logits, expected_routed)
    for expert in (0, 1):
        assert torch.equal(forced(peft_model, expert, batch), expected[expert])

    peft_model.train()
    loss = peft_model(input_ids=batch[0], attention_mask=batch[1], labels=batch[0]).loss
    loss.backward()
    with_grad = {name for name, param in peft_model.named_parameters() if param.grad is not None}
    assert with_grad == trainable
    assert all(peft_model.get_parameter(name).grad.abs().sum() > 0 for name in with_grad if ".lora_A." not in name)

    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and not any(".experts." in key for key in saved)
