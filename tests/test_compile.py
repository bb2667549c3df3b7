"""`torch.compile` of the default model: it traces, gives the eager logits (within float32 rounding), and breaks the
graph only where routing decides (once per forward, not per layer).

`aot_eager` runs dynamo and AOT autograd (where graph breaks and tracing errors come from) without inductor's C++
build, which takes about a minute on 2 cores; `benchmarks/compile_check.py` runs inductor (README, "Guarantees")."""

import torch
import torch._dynamo

from helpers import make_pmoe, padded_batch, randomize_experts, screened_model, task_batch
from pmoe.modeling_pmoe import CACHE_KWARG


def test_compiled_forward_gives_the_eager_logits_and_breaks_only_where_routing_reads_the_gate():
    model = make_pmoe()
    for task in ("a", "b"):
        model.add_expert(task)
    randomize_experts(model)
    input_ids, attention_mask = padded_batch()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        # Graph breaks only where routing decides, none inside the layers: the LDA discriminant (computed eagerly from
        # its cache) and the one host read that picks the active experts, each reported once per enclosing frame.
        explanation = torch._dynamo.explain(model)(input_ids=input_ids, attention_mask=attention_mask)
        torch._dynamo.reset()
        eager = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        out = compiled(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        torch.testing.assert_close(out.logits, eager.logits)
        assert torch.equal(out.routing_weights, eager.routing_weights)
        # A decode step from the compiled prefill's cache reuses its gate.
        step = dict(input_ids=input_ids[:, -1:], attention_mask=torch.cat([attention_mask, attention_mask[:, -1:]], 1))
        eager_step = model(**step, **{CACHE_KWARG: getattr(eager, CACHE_KWARG)})
        compiled_step = compiled(**step, **{CACHE_KWARG: getattr(out, CACHE_KWARG)})
        torch.testing.assert_close(compiled_step.logits, eager_step.logits)  # (decomposed ops: float rounding)
        assert torch.equal(compiled_step.routing_weights, eager.routing_weights)
    assert explanation.break_reasons
    def at_routing(reason):
        # (and the embedding screen: whether its keys are complete, and whether it routed every row)
        return (reason.user_stack[-1].name in ("active_expert_indices", "_gate_before_layers")
                or any(name in str(reason.reason) for name in ("lda_weights", "_screen_is_complete")))

    assert all(at_routing(reason) for reason in explanation.break_reasons), [
        (str(reason.reason)[:300], [f"{frame.name}:{frame.lineno}" for frame in reason.user_stack])
        for reason in explanation.break_reasons
    ]
    torch._dynamo.reset()


def test_a_prompt_the_screen_routes_compiles_to_the_eager_logits():
    model = screened_model()
    input_ids = task_batch(1, seed=99)[0][:, :8]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        eager = model(input_ids=input_ids)
        out = compiled(input_ids=input_ids)
    torch.testing.assert_close(out.logits, eager.logits)
    assert torch.equal(out.routing_weights, eager.routing_weights) and (eager.routing_weights.argmax(-1) == 1).all()
    torch._dynamo.reset()
