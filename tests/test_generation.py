import pytest
import torch

from pmoe import PMoEForCausalLM

from helpers import TOKEN_LEARNED, greedy_by_recomputation, make_dense, make_pmoe, padded_batch, randomize_experts


def grown_model(num_experts, **overrides):
    model = make_pmoe(**overrides)
    for index in range(num_experts):
        model.add_expert(f"task-{index}")
    if num_experts:
        randomize_experts(model)
    return model.eval()


@pytest.mark.parametrize("num_experts", [0, 1, 3])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"router_top_k": 1}, {"expert_layers": "all"}, dict(TOKEN_LEARNED, router_top_k=1, router_per_layer=True)],
    ids=["sequence", "sequence-top1", "shallow-experts", "token-per-layer"],
)
def test_cached_greedy_generation_equals_recomputation(num_experts, overrides):
    model = grown_model(num_experts, **overrides)
    input_ids, attention_mask = padded_batch(batch=3, length=7, side="left")
    steps = 8
    kwargs = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    reference = greedy_by_recomputation(model, input_ids, attention_mask, steps)
    assert torch.equal(cached, reference)


def test_left_padding_does_not_change_a_row():
    model = grown_model(2)
    input_ids, attention_mask = padded_batch(batch=3, length=7, side="left")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        row = 2  # two padding tokens
        alone = model.generate(
            input_ids=input_ids[row : row + 1, 2:], attention_mask=attention_mask[row : row + 1, 2:], **kwargs
        )
    assert torch.equal(batched[row, 2:], alone[0])


def test_converted_model_generates_like_its_dense_source():
    dense = make_dense("qwen3")
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2).eval()
    model.add_expert("a")
    input_ids, attention_mask = padded_batch(batch=2, length=6, side="left")
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = dense.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        got = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("source", ["pmoe", "pmoe-all-layers", "qwen3"])
def test_static_cache_generation_matches_dynamic_cache(source):
    if source == "pmoe":
        model = grown_model(2, router_top_k=1)
    elif source == "pmoe-all-layers":  # the gate comes from an expert-free pre-pass that needs the 2D mask
        model = grown_model(2, router_top_k=1, expert_layers="all")
    else:  # converted, with sliding-window layers
        model = PMoEForCausalLM.from_dense(make_dense("qwen3"), num_shallow_layers=1).eval()
        model.add_expert("a")
        randomize_experts(model)
    input_ids, attention_mask = padded_batch(batch=2, length=6, side="left")
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        static = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, cache_implementation="static", **kwargs
        )
    assert torch.equal(static, dynamic)
