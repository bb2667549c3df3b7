import json

import pytest
from transformers import AutoConfig, GPT2Config, LlamaConfig

import pmoe
from pmoe import PMoEConfig

from helpers import TINY, tiny_pmoe_config


def test_defaults_and_derived_fields():
    config = PMoEConfig(**TINY)
    assert config.model_type == "pmoe"
    assert config.num_shallow_layers == 2  # num_hidden_layers // 2
    assert config.head_dim == 8
    assert config.expert_alpha == 2 * config.expert_rank
    assert config.expert_scaling == 2.0
    assert config.expert_target_modules == [*pmoe.configuration_pmoe.EXPERT_TARGET_MODULES, "embed_tokens"]
    assert config.expert_embeddings and config.expert_projections == list(pmoe.configuration_pmoe.EXPERT_TARGET_MODULES)
    deep = PMoEConfig(**TINY, expert_layers="deep")  # embedding experts need the expert-free pass of layout "all"
    assert deep.expert_target_modules == list(pmoe.configuration_pmoe.EXPERT_TARGET_MODULES)
    assert not deep.expert_embeddings
    # Checkpoints saved before embedding experts wrote their target list out: it keeps meaning the same modules.
    saved = PMoEConfig.from_dict(PMoEConfig(**TINY, expert_target_modules=["q_proj", "v_proj"]).to_dict())
    assert saved.expert_target_modules == ["q_proj", "v_proj"] and not saved.expert_embeddings
    assert config.num_experts == 0 and config.expert_tasks == []
    assert config.router_top_k is None and config.effective_top_k == 0
    assert config.layer_types == ["full_attention"] * 4
    assert config.rope_parameters["rope_type"] == "default"
    assert config.deep_layer_indices == [2, 3]


def test_rslora_scaling():
    config = tiny_pmoe_config(expert_rank=16, expert_alpha=8, expert_use_rslora=True)
    assert config.expert_scaling == pytest.approx(8 / 4)


def test_effective_top_k_caps_at_expert_count():
    config = tiny_pmoe_config(router_top_k=2, num_experts=1, expert_tasks=["a"])
    assert config.effective_top_k == 1
    config = tiny_pmoe_config(router_top_k=2, num_experts=3, expert_tasks=["a", "b", "c"])
    assert config.effective_top_k == 2


def test_round_trip_through_json(tmp_path):
    config = tiny_pmoe_config(num_experts=2, expert_tasks=["sql", "chat"], router_top_k=1, expert_rank=2)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "pmoe"
    assert saved["expert_tasks"] == ["sql", "chat"]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PMoEConfig)
    for field in ("num_experts", "expert_tasks", "router_top_k", "expert_rank", "num_shallow_layers", "head_dim"):
        assert getattr(loaded, field) == getattr(config, field)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        (dict(num_shallow_layers=4), "num_shallow_layers", "[0, 3]"),
        (dict(num_shallow_layers=-1), "num_shallow_layers", "[0, 3]"),
        (dict(expert_rank=0), "expert_rank", ">= 1"),
        (dict(expert_alpha=0), "expert_alpha", "> 0"),
        (dict(expert_dropout=1.0), "expert_dropout", "[0, 1)"),
        (dict(expert_target_modules=["q_proj", "qkv"]), "expert_target_modules", "q_proj"),
        (dict(expert_target_modules=[]), "expert_target_modules", "non-empty"),
        (dict(expert_target_modules=["q_proj", "embed_tokens"], expert_layers="deep"), "expert_target_modules",
         "without 'embed_tokens' unless expert_layers='all'"),
        (dict(router_top_k=-1), "router_top_k", "dense"),
        (dict(router_top_k=3, max_experts=2), "router_top_k", "[1, 2]"),
        (dict(router_temperature=0.0), "router_temperature", "> 0"),
        (dict(router_min_gate=1.0), "router_min_gate", "[0, 1)"),
        (dict(router_min_gate=-0.1), "router_min_gate", "[0, 1)"),
        (dict(router_activation="relu"), "router_activation", "sigmoid"),
        (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef", ">= 0"),
        (dict(num_experts=-1), "num_experts", ">= 0"),
        (dict(num_experts=2, expert_tasks=["a"]), "expert_tasks", "num_experts=2"),
        (dict(num_experts=2, expert_tasks=["a", "a"]), "expert_tasks", "distinct"),
        (dict(num_experts=3, expert_tasks=["a", "b", "c"], max_experts=2), "max_experts", ">= max(1, num_experts=3)"),
        (dict(num_key_value_heads=3), "num_key_value_heads", "divisor"),
        (dict(layer_types=["full_attention"] * 3), "layer_types", "list of 4"),
        (dict(layer_types=["sliding_attention"] * 4), "sliding_window", "positive integer"),
    ],
)
def test_invalid_values_name_the_field_and_range(overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        tiny_pmoe_config(**overrides)
    message = str(error.value)
    assert f"PMoEConfig.{field}" in message
    assert allowed in message


def test_checkpoint_from_a_newer_pmoe_is_refused():
    with pytest.raises(ValueError, match="made by a newer pmoe"):
        tiny_pmoe_config(pmoe_format_version=pmoe.PMOE_FORMAT_VERSION + 1)


def test_from_dense_config_rejects_unsupported_architectures():
    with pytest.raises(ValueError) as error:
        PMoEConfig.from_dense_config(GPT2Config(n_layer=2))
    message = str(error.value)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "'gpt2'"):
        assert name in message


def test_from_dense_config_rejects_unknown_options_and_experts():
    with pytest.raises(ValueError, match="Unknown PMoE option"):
        PMoEConfig.from_dense_config(LlamaConfig(**TINY), expert_rnak=4)
    with pytest.raises(ValueError, match="add_expert"):
        PMoEConfig.from_dense_config(LlamaConfig(**TINY), num_experts=2)
