"""Every generation and output path transformers offers, with experts active (LoRA B non-zero, keys fitted): the
expert-free pre-pass stays out of the outputs, forwards continue from a cache with the prompt's gate, packed rows are
routed sequence by sequence, both names of the cache argument work, and weights initialise and tie as transformers
expects. Found by running transformers' own common model tests against PMoE."""

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pmoe import PMoEForCausalLM
from pmoe.configuration_pmoe import EXPERT_TARGET_MODULES
from pmoe.modeling_pmoe import CACHE_KWARG

from helpers import VOCAB, make_pmoe, padded_batch, randomize_experts


def grown(num_experts=2, **overrides):
    model = make_pmoe(**overrides)
    for index in range(num_experts):
        model.add_expert(f"task-{index}")
    randomize_experts(model)
    return model.eval()


GREEDY = dict(do_sample=False, pad_token_id=0)


def test_cache_argument_is_accepted_under_both_names():
    model = grown(expert_layers="all")
    input_ids, attention_mask = padded_batch(batch=2, length=8)
    with torch.no_grad():
        prefill = model(input_ids=input_ids[:, :5], attention_mask=attention_mask[:, :5], use_cache=True)
        cache = getattr(prefill, CACHE_KWARG)
        results = []
        for name in ("cache", "past_key_values"):  # the same continuation from a copy of the same cache
            out = model(input_ids=input_ids[:, 5:], attention_mask=attention_mask, use_cache=True,
                        **{name: copy.deepcopy(cache)})
            results.append(out.logits)
        with pytest.raises(ValueError, match="two different KV caches"):
            model(input_ids=input_ids[:, 5:], cache=cache, past_key_values=type(cache)())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("layout", ["all", "deep"])
def test_prepass_is_not_part_of_the_outputs(layout):
    model = grown(expert_layers=layout)
    model.set_attn_implementation("eager")
    input_ids, attention_mask = padded_batch(batch=2, length=7)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        out = model(**kwargs)
        # The same gate passed in: no pre-pass at all. Every recorded state must be the main pass's.
        reference = model(**kwargs, routing_weights=out.routing_weights)
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == layers + 1 and len(out.attentions) == layers
    for got, expected in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
        assert torch.equal(got, expected)

    # transformers' retain_grad test: every recorded state is part of the graph that produces the logits.
    model.train().requires_grad_(True)  # as transformers' test builds it: nothing frozen
    out = model(**kwargs)
    out.hidden_states[1].retain_grad()
    out.attentions[0].retain_grad()
    out.logits.flatten()[0].backward()
    assert out.hidden_states[1].grad is not None and out.attentions[0].grad is not None


@pytest.mark.parametrize("layout", ["all", "deep"])
def test_forward_continuing_from_a_cache_uses_the_prompts_gate(layout):
    model = grown(expert_layers=layout)
    input_ids, attention_mask = padded_batch(batch=3, length=10)
    with torch.no_grad():
        prefill = model(input_ids=input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True)
        # No routing_weights: before the fix the pre-pass built its masks for 4 tokens from a 10-token 2D mask.
        step = model(
            input_ids=input_ids[:, 6:], attention_mask=attention_mask, use_cache=True,
            **{CACHE_KWARG: getattr(prefill, CACHE_KWARG)},
        )
        reference = model(input_ids=input_ids, attention_mask=attention_mask, routing_weights=prefill.routing_weights)
    assert torch.equal(step.routing_weights, prefill.routing_weights)
    torch.testing.assert_close(step.logits, reference.logits[:, 6:], rtol=1e-5, atol=1e-5)


def test_a_cache_without_a_gate_routes_from_the_new_tokens():
    """A cache filled elsewhere (no gate carried): the gate comes from the tokens of this forward, no error."""
    model = grown(expert_layers="all")
    input_ids, attention_mask = padded_batch(batch=2, length=9)
    with torch.no_grad():
        cache = getattr(model(input_ids=input_ids[:, :5], attention_mask=attention_mask[:, :5], use_cache=True),
                        CACHE_KWARG)
        del cache.pmoe_routing_weights
        out = model(input_ids=input_ids[:, 5:], attention_mask=attention_mask, use_cache=True, **{CACHE_KWARG: cache})
    assert torch.isfinite(out.logits).all()
    assert out.routing_weights.shape == (2, 2) and torch.allclose(out.routing_weights.sum(-1), torch.ones(2))


@pytest.mark.parametrize("layout", ["all", "deep"])
def test_generation_continued_from_its_cache_equals_one_uninterrupted_generate(layout):
    model = grown(expert_layers=layout)
    input_ids, attention_mask = padded_batch(batch=3, length=7)
    with torch.no_grad():
        whole = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8,
                               min_new_tokens=8, **GREEDY)
        first = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4,
                               min_new_tokens=4, return_dict_in_generate=True, **GREEDY)
        mask = torch.cat([attention_mask, torch.ones(3, 4, dtype=attention_mask.dtype)], dim=-1)
        second = model.generate(input_ids=first.sequences, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                **{CACHE_KWARG: getattr(first, CACHE_KWARG)}, **GREEDY)
    assert torch.equal(second, whole)


def test_generation_continued_from_inputs_embeds_equals_one_uninterrupted_generate():
    model = grown(expert_layers="all", expert_target_modules=list(EXPERT_TARGET_MODULES))  # embedding experts need ids
    input_ids, attention_mask = padded_batch(batch=2, length=7)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        embeds = embed(input_ids)
        whole = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=6,
                               min_new_tokens=6, **GREEDY)
        first = model.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=3,
                               min_new_tokens=3, return_dict_in_generate=True, **GREEDY)
        more_embeds = torch.cat([embeds, embed(first.sequences)], dim=1)
        mask = torch.cat([attention_mask, torch.ones(2, 3, dtype=attention_mask.dtype)], dim=-1)
        second = model.generate(inputs_embeds=more_embeds, attention_mask=mask, max_new_tokens=3, min_new_tokens=3,
                                **{CACHE_KWARG: getattr(first, CACHE_KWARG)}, **GREEDY)
    assert torch.equal(torch.cat([first.sequences, second], dim=-1), whole)


def test_a_static_cache_reused_for_a_new_prompt_routes_that_prompt():
    """`generate` resets and reuses its static cache across calls: the new prompt must not inherit the old gate."""
    model = grown(expert_layers="all")
    a_ids, a_mask = padded_batch(batch=2, length=6, seed=1)
    b_ids, b_mask = padded_batch(batch=2, length=6, seed=2)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, **GREEDY)
    with torch.no_grad():
        expected = model.generate(input_ids=b_ids, attention_mask=b_mask, **kwargs)
        model.generate(input_ids=a_ids, attention_mask=a_mask, cache_implementation="static", **kwargs)
        got = model.generate(input_ids=b_ids, attention_mask=b_mask, cache_implementation="static", **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("layout", ["all", "deep"])
def test_packed_rows_route_each_sequence_like_the_padded_batch(layout):
    model = grown(expert_layers=layout)
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 3, 6]
    sequences = [torch.randint(3, VOCAB, (length,), generator=generator) for length in lengths]
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    packed = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
    with torch.no_grad():
        reference = model(input_ids=padded, attention_mask=mask, use_cache=False)
        out = model(input_ids=packed, position_ids=position_ids, use_cache=False)
    starts = [0, 5, 8]
    for row, (start, length) in enumerate(zip(starts, lengths)):
        torch.testing.assert_close(out.logits[0, start : start + length], reference.logits[row, :length],
                                   rtol=1e-5, atol=1e-5)
    assert out.routing_weights is None  # one gate per packed sequence: no (batch, experts) gate to return


def test_packed_training_fits_one_key_sample_per_sequence():
    model = make_pmoe(expert_layers="all")
    model.add_expert("a")
    model.train()
    generator = torch.Generator().manual_seed(4)
    packed = torch.randint(3, VOCAB, (2, 12), generator=generator)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4], list(range(12))])
    labels = packed.clone()
    labels[position_ids < 2] = -100  # each packed sequence's prompt: its first two tokens
    labels[0, 7] = 3  # ... but the third sequence has no prompt label: it routes from all its tokens
    features = []
    model.model.routers[0].experts[0].accumulate = features.append
    model(input_ids=packed, position_ids=position_ids, labels=labels, use_cache=False).loss.backward()
    assert [tuple(batch.shape) for batch in features] == [(4, model.config.hidden_size)]  # 3 packed + 1 plain row
    assert (features[0].norm(dim=-1) > 0).all()


def test_init_weights_initialises_every_tensor_experts_and_router_included():
    source = grown(num_experts=3)
    with torch.device("meta"):
        model = PMoEForCausalLM(source.config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.fill_(float("nan"))
    model.init_weights()
    not_initialised = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()]
                       if not torch.isfinite(tensor).all()]
    assert not_initialised == []
    for linear in model.expert_linears():
        for expert in linear.experts:  # a new expert changes nothing until trained
            assert torch.equal(expert.lora_B, torch.zeros_like(expert.lora_B))
    assert all(entry.count.item() == 0 for router in model.expert_routers() for entry in router.experts)


def test_tied_embeddings_survive_save_and_reload(tmp_path):
    model = grown(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = PMoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                           model(input_ids=input_ids, attention_mask=attention_mask).logits)


NO_DEPRECATIONS = textwrap.dedent("""
    import logging, warnings
    warnings.simplefilter("error", FutureWarning)
    warnings.simplefilter("error", DeprecationWarning)
    import torch, transformers
    from transformers.utils import logging as hf_logging
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    hf_logging.get_logger("transformers").addHandler(Keep())
    import pmoe
    from pmoe.modeling_pmoe import CACHE_KWARG
    torch.manual_seed(0)
    config = pmoe.PMoEConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, num_shallow_layers=1, expert_rank=2,
                             pad_token_id=0, eos_token_id=2)
    model = pmoe.PMoEForCausalLM(config)
    model.add_expert("a")
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        model(input_ids=ids[:, :1], attention_mask=torch.ones(2, 7), **{CACHE_KWARG: getattr(out, CACHE_KWARG)})
        for cache in ("dynamic", "static"):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                           cache_implementation=cache)
    bad = [message for message in records if "deprecat" in message.lower()]
    assert not bad, bad
    print("ok")
""")


def test_no_deprecation_warnings_from_pmoes_own_calls():
    result = subprocess.run(
        [sys.executable, "-c", NO_DEPRECATIONS], capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning"},
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_packed_rows_distil_like_the_padded_batch():
    """Lifelong-MoE distillation on packed rows: the old model's gate is each packed sequence's, as in training."""
    model = grown(num_experts=2, expert_layers="all", distillation_alpha=1.0)
    model.training_expert = 1
    generator = torch.Generator().manual_seed(5)
    lengths = [4, 6]
    sequences = [torch.randint(3, VOCAB, (length,), generator=generator) for length in lengths]
    padded = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)], mask[row, : len(sequence)] = sequence, 1
    labels = padded.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # prompts: the first two tokens
    packed_labels = torch.cat([labels[0, :4], labels[1]])[None]
    packed = torch.cat(sequences)[None]
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
    model.train()
    reference = model(input_ids=padded, attention_mask=mask, labels=labels, use_cache=False)
    out = model(input_ids=packed, position_ids=position_ids, labels=packed_labels, use_cache=False)
    torch.testing.assert_close(out.distillation_loss, reference.distillation_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-4, atol=1e-6)
