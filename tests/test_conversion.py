import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaModel

from pmoe import PMoEForCausalLM

from helpers import FAMILIES, TINY, make_dense, padded_batch, randomize_experts


def max_diff_on_real_tokens(a, b, attention_mask):
    keep = attention_mask.bool()
    return (a[keep] - b[keep]).abs().max().item()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_converted_model_matches_dense_before_and_after_growth(family, padding_side):
    dense = make_dense(family)
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2, expert_rank=4).eval()
    assert model.config.num_experts == 0
    input_ids, attention_mask = padded_batch(batch=3, length=11, side=padding_side)
    with torch.no_grad():
        expected = dense(input_ids=input_ids, attention_mask=attention_mask).logits
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert max_diff_on_real_tokens(got, expected, attention_mask) <= 1e-5

        model.add_expert("task-a")
        model.add_expert("task-b")
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert max_diff_on_real_tokens(got, expected, attention_mask) <= 1e-5


def test_conversion_with_a_hidden_size_above_the_router_projection():
    # Real models (hidden 4096 > router_projection_size 256) get an LDA projection buffer, which no dense checkpoint
    # has: conversion must build it, not refuse the weights as misaligned.
    dense = make_dense("llama")
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2, router_projection_size=8).eval()
    assert model.model.routers[0].projection.shape == (8, TINY["hidden_size"])
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids, attention_mask=attention_mask).logits,
                                   dense(input_ids=input_ids, attention_mask=attention_mask).logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conversion_copies_every_weight_and_keeps_the_source(family):
    dense = make_dense(family)
    before = {name: tensor.clone() for name, tensor in dense.state_dict().items()}
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=1)
    converted = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(converted[name], tensor), name
    # The PMoE weights are copies: training them must not touch the dense source.
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])


def test_conversion_keeps_family_specific_structure():
    qwen2 = PMoEForCausalLM.from_dense(make_dense("qwen2"))
    attention = qwen2.model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    assert qwen2.config.tie_word_embeddings
    assert qwen2.lm_head.weight is qwen2.model.embed_tokens.weight

    qwen3 = PMoEForCausalLM.from_dense(make_dense("qwen3"))
    assert qwen3.model.layers[0].self_attn.q_norm is not None
    assert qwen3.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2

    mistral = PMoEForCausalLM.from_dense(make_dense("mistral"))
    assert mistral.config.sliding_window == 5
    assert mistral.config.head_dim == 16


def test_conversion_from_a_saved_folder(tmp_path):
    dense = make_dense("llama")
    dense.save_pretrained(tmp_path / "dense")
    model = PMoEForCausalLM.from_dense(str(tmp_path / "dense"), num_shallow_layers=3).eval()
    assert model.config.num_shallow_layers == 3
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        expected = dense(input_ids=input_ids, attention_mask=attention_mask).logits
        got = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert max_diff_on_real_tokens(got, expected, attention_mask) <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_conversion_keeps_the_attention_implementation(attn_implementation):
    dense = make_dense("llama")
    dense.set_attn_implementation(attn_implementation)
    model = PMoEForCausalLM.from_dense(dense)
    assert model.config._attn_implementation == attn_implementation


def test_sdpa_and_eager_agree_with_experts():
    dense = make_dense("qwen3")
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2, router_top_k=1).eval()
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(input_ids=input_ids, attention_mask=attention_mask).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert max_diff_on_real_tokens(sdpa, eager, attention_mask) <= 1e-5


def test_unsupported_architecture_lists_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    with pytest.raises(ValueError) as error:
        PMoEForCausalLM.from_dense(gpt2)
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in str(error.value)


def test_a_base_model_without_lm_head_is_refused():
    with pytest.raises(ValueError, match="expects a causal LM"):
        PMoEForCausalLM.from_dense(LlamaModel(LlamaConfig(**TINY)))


def test_from_dense_refuses_other_inputs():
    with pytest.raises(TypeError, match="PreTrainedModel or a path"):
        PMoEForCausalLM.from_dense(42)


def test_tied_embeddings_survive_save_and_load(tmp_path):
    model = PMoEForCausalLM.from_dense(make_dense("qwen2"), num_shallow_layers=2).eval()
    model.add_expert("a")
    randomize_experts(model)
    model.save_pretrained(tmp_path)
    loaded = PMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
            model(input_ids=input_ids, attention_mask=attention_mask).logits,
        )
