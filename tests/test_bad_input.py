"""Bad input at run time (issue 7, item 4): each case is a clear error or a defined, tested behaviour."""

import copy
import warnings

import pytest
import torch

import pmoe
from pmoe.experts_pmoe import route

from helpers import (
    TINY, TOKEN_LEARNED, VOCAB, greedy_by_recomputation, make_dense, make_pmoe, padded_batch, randomize_experts,
    tiny_pmoe_config,
)


def grown(num_experts=2, seed=0, **overrides):
    model = make_pmoe(seed=seed, **overrides)
    for index in range(num_experts):
        model.add_expert(f"task-{index}")
    randomize_experts(model)
    return model.eval()


def classifier(num_experts=3, **overrides):
    torch.manual_seed(0)
    model = pmoe.PMoEForSequenceClassification(tiny_pmoe_config(num_labels=3, **overrides))
    for index in range(num_experts):
        model.add_expert(f"task-{index}")
    randomize_experts(model)
    return model.eval()


def left_positions(attention_mask):
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------------ empty input
@pytest.mark.parametrize("shape", [(0, 5), (2, 0), (0, 0)], ids=["no-rows", "no-tokens", "nothing"])
def test_empty_batches_and_empty_sequences_are_refused(shape):
    model = grown()
    input_ids = torch.zeros(shape, dtype=torch.long)
    message = rf"input_ids is empty \(shape \({shape[0]}, {shape[1]}\)\): PMoE needs at least one sequence"
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=torch.ones(shape, dtype=torch.long))
    with pytest.raises(ValueError, match=r"inputs_embeds is empty"):
        model(inputs_embeds=torch.zeros(*shape, TINY["hidden_size"]))
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=input_ids, max_new_tokens=2)
    with pytest.raises(ValueError, match=message):
        classifier()(input_ids=input_ids)


# ----------------------------------------------------------------------------------------- all-padding rows
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize(
    "overrides", [{}, {"router_top_k": 1}, TOKEN_LEARNED, {"expert_layers": "all"}],
    ids=["sequence", "sequence-top1", "token-learned", "shallow-experts"],
)
def test_an_all_padding_row_is_finite_and_changes_no_other_row(side, overrides):
    model = grown(3, **overrides)
    input_ids, attention_mask = padded_batch(batch=4, length=7, side=side)
    padded_ids, padded_mask = input_ids.clone(), attention_mask.clone()
    padded_ids[2], padded_mask[2] = TINY["pad_token_id"], 0
    kwargs = {}
    with torch.no_grad():
        if side == "left":
            kwargs = dict(position_ids=left_positions(padded_mask))
        out = model(input_ids=padded_ids, attention_mask=padded_mask, **kwargs)
        others = [0, 1, 3]
        if side == "left":
            kwargs = dict(position_ids=left_positions(attention_mask[others]))
        alone = model(input_ids=input_ids[others], attention_mask=attention_mask[others], **kwargs)
    assert torch.isfinite(out.logits).all()
    real = attention_mask[others].bool()
    torch.testing.assert_close(out.logits[others][real], alone.logits[real], atol=1e-5, rtol=1e-5)
    if model.config.routing == "sequence":
        assert torch.isfinite(out.routing_weights).all()
        torch.testing.assert_close(out.routing_weights[others], alone.routing_weights)


@pytest.mark.parametrize("overrides", [{}, {"router_top_k": 1}, {"router_keys": "learned"}])
def test_an_all_padding_row_routes_like_the_zero_feature(overrides):
    """Sequence routing averages the features of the routing tokens; with none, the mean is defined as 0 (the
    denominator is clamped to 1), so the row gets the router's gate for the zero feature: finite, never NaN."""
    model = grown(3, **overrides)
    input_ids, attention_mask = padded_batch(batch=3, length=6)
    attention_mask[1] = 0
    with torch.no_grad():
        gates = model(input_ids=input_ids, attention_mask=attention_mask).routing_weights
        router = model.model.routers[0]
        zero = torch.zeros(1, 1, TINY["hidden_size"])
        config = model.config
        expected = route(router.logits(zero), config.router_activation, config.router_top_k, config.router_min_gate)
    expected = expected[:, 0]
    torch.testing.assert_close(gates[1:2], expected)


def test_an_all_padding_row_does_not_fit_the_gaussian_key_in_training():
    model = grown(2)
    model.training_expert = 1
    entry = model.model.routers[0].experts[1]
    input_ids, attention_mask = padded_batch(batch=3, length=6)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    padded_mask = attention_mask.clone()
    padded_mask[1] = 0
    padded_labels = labels.clone()
    padded_labels[1] = -100

    def statistics_after(ids, mask, targets):
        for name in entry.statistics:
            getattr(entry, name).zero_()
        model.model.routers[0].usage.zero_()
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=targets)
        model.eval()
        return [t.clone() for t in (entry.count, entry.feature_sum, model.model.routers[0].usage)]

    with_pad_row = statistics_after(input_ids, padded_mask, padded_labels)
    without = statistics_after(input_ids[[0, 2]], attention_mask[[0, 2]], labels[[0, 2]])
    assert with_pad_row[0].item() == 2.0  # two sequences fitted, not three
    for a, b in zip(with_pad_row, without):
        torch.testing.assert_close(a, b)


def test_expert_choice_gives_an_all_padding_row_no_expert():
    model = classifier(routing="expert_choice")
    input_ids, attention_mask = padded_batch(batch=3, length=6, side="right")
    padded_mask = attention_mask.clone()
    padded_mask[1] = 0
    base = copy.deepcopy(model)
    with torch.no_grad():
        for linear in base.expert_linears():
            for expert in linear.experts:
                expert.lora_B.zero_()
        out = model(input_ids=input_ids, attention_mask=padded_mask).logits
        without_experts = base(input_ids=input_ids, attention_mask=padded_mask).logits
        others = model(input_ids=input_ids[[0, 2]], attention_mask=attention_mask[[0, 2]]).logits
    assert torch.isfinite(out).all()
    # Experts choose among real tokens only: the padding row gets no expert (its logits are the base model's, read
    # at position 0 like LlamaForSequenceClassification's).
    torch.testing.assert_close(out[1], without_experts[1])
    torch.testing.assert_close(out[[0, 2]], others, atol=1e-5, rtol=1e-5)


def test_generation_with_an_all_padding_row():

    model = grown(2)
    input_ids, attention_mask = padded_batch(batch=3, length=7, side="left")
    input_ids[1], attention_mask[1] = TINY["pad_token_id"], 0
    steps = 5
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        others = model.generate(input_ids=input_ids[[0, 2]], attention_mask=attention_mask[[0, 2]], **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_by_recomputation(model, input_ids, attention_mask, steps))
    assert torch.equal(cached[[0, 2]], others)  # the empty row changes nobody else's tokens


# ------------------------------------------------------------------------------------- beyond the position limit
def test_sequences_beyond_max_position_embeddings_extrapolate_like_llama():
    """As in Llama: no error and no warning from forward (rotary positions extrapolate); `generate` itself warns once
    when it runs past `max_position_embeddings`."""
    dense = make_dense("llama")
    model = pmoe.PMoEForCausalLM.from_dense(copy.deepcopy(dense), num_shallow_layers=2, expert_rank=4).eval()
    model.add_expert("task")
    randomize_experts(model)
    with torch.no_grad():
        for module in model.expert_modules():
            module.experts[0].lora_B.zero_()  # a no-op expert, so the logits must be Llama's
    length = TINY["max_position_embeddings"] + 40
    input_ids = torch.randint(3, VOCAB, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        logits = model(input_ids=input_ids).logits
        expected = dense(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    prompt = input_ids[:, : TINY["max_position_embeddings"] - 2]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=prompt, use_cache=False, **kwargs)
    assert cached.shape[1] == TINY["max_position_embeddings"] + 4
    assert torch.equal(cached, uncached)


# -------------------------------------------------------------------------------------------- token ids
@pytest.mark.parametrize("bad, low, high", [(VOCAB, 5, VOCAB), (VOCAB + 50, 5, VOCAB + 50), (-1, -1, 5), (-7, -7, 5)])
def test_token_ids_out_of_range_name_the_range_and_the_vocabulary(bad, low, high):
    model = grown()
    input_ids = torch.tensor([[5, bad, 5], [5, 5, 5]])
    message = rf"input_ids must be token ids in \[0, vocab_size\) = \[0, {VOCAB}\), got ids from {low} to {high}\."
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids)
    with pytest.raises(ValueError, match=message):
        classifier()(input_ids=input_ids)
    model(input_ids=torch.tensor([[0, VOCAB - 1]]))  # the ends of the range are fine


def test_the_token_id_check_follows_resized_embeddings():
    model = grown()
    model.resize_token_embeddings(VOCAB + 3)
    model(input_ids=torch.tensor([[VOCAB + 2]]))
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB + 3}\), got ids from {VOCAB + 3} to {VOCAB + 3}"):
        model(input_ids=torch.tensor([[VOCAB + 3]]))


# ------------------------------------------------------------------------------------------ inputs_embeds
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_embeds_are_refused(value):
    model = grown()
    embeds = torch.randn(2, 4, TINY["hidden_size"])
    embeds[1, 2, 3] = value
    with pytest.raises(ValueError, match=r"inputs_embeds contains NaN or infinite values"):
        model(inputs_embeds=embeds)


def test_inputs_embeds_of_the_wrong_shape_are_refused():
    model = grown()
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch_size, sequence_length, "
                                         r"hidden_size=32\), got \(2, 4, 16\)"):
        model(inputs_embeds=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch_size, sequence_length\), got \(4,\)"):
        model(input_ids=torch.tensor([3, 4, 5, 6]))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=torch.tensor([[3]]), inputs_embeds=torch.randn(1, 1, 32))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


# ------------------------------------------------------------------------------- top-k above the expert count
def test_top_k_above_the_expert_count_uses_every_expert_after_a_round_trip(tmp_path):
    model = grown(2, router_top_k=4, router_min_gate=0.0)  # (no gate floor: both experts keep their gates)
    dense_gating = copy.deepcopy(model)
    dense_gating.config.router_top_k = None
    input_ids, attention_mask = padded_batch(batch=3, length=6)
    model.save_pretrained(tmp_path)
    loaded = pmoe.PMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.router_top_k == 4 and loaded.config.num_experts == 2
    assert loaded.config.effective_top_k == 2
    with torch.no_grad():
        out = loaded(input_ids=input_ids, attention_mask=attention_mask)
        reference = dense_gating(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(out.logits, reference.logits)
    assert torch.equal(out.routing_weights, reference.routing_weights)
    assert torch.count_nonzero(out.routing_weights) == out.routing_weights.numel()  # both experts used


# ------------------------------------------------------------------------------------------ routing_weights
def test_routing_weights_are_checked():
    model = grown(2)
    input_ids, attention_mask = padded_batch(batch=3, length=5)
    with pytest.raises(ValueError, match=r"routing_weights must have shape \(batch_size, num_experts\) = \(3, 2\), "
                                         r"got \(3, 3\)"):
        model(input_ids=input_ids, routing_weights=torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"= \(3, 2\), got \(3, 1, 2\)"):
        model(input_ids=input_ids, routing_weights=torch.ones(3, 1, 2))
    for bad in (-0.5, float("nan"), float("inf")):
        weights = torch.full((3, 2), 0.5)
        weights[1, 0] = bad
        with pytest.raises(ValueError, match=r"routing_weights must be finite and >= 0 \(a row of zeros means no "
                                             r"expert\), got \[\[0.5, 0.5\], \["):
            model(input_ids=input_ids, routing_weights=weights)
    # Zeros are valid: no expert, the base model.
    with torch.no_grad():
        none = model(input_ids=input_ids, attention_mask=attention_mask, routing_weights=torch.zeros(3, 2)).logits
        base = grown(0)(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(none, base)


def test_routing_weights_are_refused_without_sequence_routing():
    model = grown(2, **TOKEN_LEARNED)
    with pytest.raises(ValueError, match=r"routing_weights are sequence-routing gates, but this model routes with "
                                         r"routing='token'"):
        model(input_ids=torch.tensor([[3, 4]]), routing_weights=torch.ones(1, 2))


# ------------------------------------------------------------------------------------------- mask shapes
@pytest.mark.parametrize("mask_shape", [(2, 4), (2, 6), (3, 5), (1, 5)])
def test_attention_mask_of_the_wrong_shape_is_refused(mask_shape):
    model = grown(2)
    input_ids = torch.randint(3, VOCAB, (2, 5))
    mask = torch.ones(mask_shape, dtype=torch.long)
    message = rf"attention_mask has shape \({mask_shape[0]}, {mask_shape[1]}\) but the input is 2 sequences of 5 " \
              r"tokens: expected \(2, 5\)\."
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=mask)
    with pytest.raises(ValueError, match=message):
        model(input_ids=input_ids, attention_mask=mask, labels=input_ids)
    with pytest.raises(ValueError, match=message):
        classifier()(input_ids=input_ids, attention_mask=mask)
    with pytest.raises(ValueError, match=message):
        grown(2, **TOKEN_LEARNED)(input_ids=input_ids, attention_mask=mask)


def test_with_a_cache_the_mask_may_cover_the_cached_tokens_too():
    model = grown(2)
    input_ids, attention_mask = padded_batch(batch=2, length=5)
    with torch.no_grad():
        prefill = model(input_ids=input_ids[:, :4], attention_mask=attention_mask[:, :4], use_cache=True)
        model(input_ids=input_ids[:, 4:], attention_mask=attention_mask, past_key_values=prefill.past_key_values,
              routing_weights=prefill.routing_weights)
        with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 5\) but the input is 2 sequences of 1 "
                                             r"tokens: expected \(2, past \+ 1\)"):
            model(input_ids=input_ids[:, 4:], attention_mask=torch.ones(3, 5), past_key_values=prefill.past_key_values)


def test_labels_and_routing_mask_of_the_wrong_shape_are_refused():
    model = grown(2)
    input_ids = torch.randint(3, VOCAB, (2, 5))
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\) but the input is \(2, 5\): they must match"):
        model(input_ids=input_ids, labels=input_ids[:, :4])
    with pytest.raises(ValueError, match=r"routing_mask must have shape \(batch_size, sequence_length\) = \(2, 5\)"):
        model(input_ids=input_ids, routing_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"routing_mask must have shape .* got \(3, 5\)"):
        model(input_ids=input_ids, routing_mask=torch.ones(3, 5))
