"""Sequence-level routing with Gaussian task keys: what makes the model not forget without a task id."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from pmoe import PMoEForCausalLM

from helpers import fit_task, make_dense, make_pmoe, padded_batch, randomize_experts, screened_model, task_batch


def routed_expert(model, task, seed=99, batch=8):
    input_ids, labels = task_batch(task, seed=seed, batch=batch)
    prompt = input_ids[:, :8]
    with torch.no_grad():
        return model(input_ids=prompt).routing_weights.argmax(-1)


def test_gate_is_one_per_sequence_from_its_prompt():
    model = make_pmoe()
    for index in range(2):
        model.add_expert(f"t{index}")
    randomize_experts(model)
    input_ids, labels = task_batch(0)
    with torch.no_grad():
        first = model(input_ids=input_ids, labels=labels).routing_weights
        changed_answer = input_ids.clone()
        changed_answer[:, 8:] = 3  # the answer is not part of the routing feature
        second = model(input_ids=changed_answer, labels=labels).routing_weights
        prompt_only = model(input_ids=input_ids[:, :8]).routing_weights
    assert first.shape == (8, 2)
    assert torch.equal(first, second)
    torch.testing.assert_close(prompt_only, first)


def test_gaussian_keys_route_each_task_to_its_own_expert_and_growth_keeps_old_routes():
    model = make_pmoe(router_top_k=1)
    for task in range(2):
        model.add_expert(f"task-{task}")
        fit_task(model, task, task)
    for task in range(2):
        accuracy = (routed_expert(model, task, batch=64) == task).float().mean()
        assert accuracy >= 0.95, (task, accuracy)

    input_ids, attention_mask = padded_batch()
    old_inputs = [task_batch(task, seed=7)[0][:, :8] for task in range(2)]
    with torch.no_grad():
        before = [model(input_ids=ids).routing_weights for ids in old_inputs]
        logits_before = [model(input_ids=ids).logits for ids in old_inputs]
    model.add_expert("task-2")  # unfitted: scores -inf, takes nothing
    with torch.no_grad():
        for ids, weights, logits in zip(old_inputs, before, logits_before):
            out = model(input_ids=ids)
            assert torch.equal(out.routing_weights[:, :2], weights)
            assert torch.count_nonzero(out.routing_weights[:, 2]) == 0
            assert torch.equal(out.logits, logits)  # the unused expert is not computed at all
    fit_task(model, 2, 2)
    with torch.no_grad():
        for ids, weights in zip(old_inputs, before):
            assert torch.equal(model(input_ids=ids).routing_weights[:, :2], weights)
    assert (routed_expert(model, 2, batch=64) == 2).float().mean() >= 0.95


def test_training_routes_batches_to_the_expert_being_trained():
    model = make_pmoe()
    model.add_expert("a")
    model.train()
    input_ids, labels = task_batch(0)
    out = model(input_ids=input_ids, labels=labels)
    assert torch.equal(out.routing_weights, torch.ones(8, 1))  # from the first step, before its key is fitted
    out.loss.backward()
    assert model.model.layers[2].self_attn.q_proj.experts[0].lora_B.grad.abs().sum() > 0
    stats = model.model.routers[0].pop_log_stats()
    assert stats["load"] == [0.0] and stats["agreement"] == 0.0  # the router itself had nothing fitted yet
    assert model.model.routers[0].experts[0].count == 8  # one feature per sequence


def test_no_fitted_key_means_base_weights_only():
    dense = make_dense("llama")
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2).eval()
    model.add_expert("a")
    randomize_experts(model)
    with torch.no_grad():
        model.model.routers[0].experts[0].count.zero_()
        input_ids, attention_mask = padded_batch()
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        expected = dense(input_ids=input_ids, attention_mask=attention_mask).logits
    assert torch.count_nonzero(out.routing_weights) == 0
    assert torch.equal(out.logits, expected)


def test_shallow_experts_are_gated_by_an_expert_free_pass():
    model = make_pmoe(expert_layers="all", router_top_k=1)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    assert model.model.layers[0].self_attn.q_proj.experts  # shallow layers carry experts too
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask)
        for linear in model.expert_linears():
            if linear is model.model.layers[0].mlp.up_proj:
                for expert in linear.experts:
                    expert.lora_B.add_(1.0)
        after = model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(after.routing_weights, before.routing_weights)  # the gate ignores the experts it selects
    assert not torch.allclose(after.logits, before.logits)  # but the shallow experts act


def test_routing_weights_shape_is_checked():
    model = make_pmoe()
    model.add_expert("a")
    input_ids, _ = padded_batch()
    with pytest.raises(ValueError, match=r"routing_weights must have shape \(batch_size, num_experts\) = \(3, 1\)"):
        model(input_ids=input_ids, routing_weights=torch.ones(3, 2))
    with pytest.raises(IndexError, match="1 experts"):
        model.training_expert = 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(routing="token", expert_layers="all"), "expert_layers"),
        (dict(router_per_layer=True), "router_per_layer"),
        (dict(routing="chunk"), "routing"),
        (dict(router_keys="knn"), "router_keys"),
        (dict(router_variance_floor=0), "router_variance_floor"),
    ],
)
def test_routing_option_errors(overrides, field):
    with pytest.raises(ValueError, match=f"PMoEConfig.{field} must be"):
        make_pmoe(**overrides)


def test_router_can_read_an_earlier_layer():
    model = make_pmoe(router_input_layer=0)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model)
    input_ids, _ = task_batch(0)
    with torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
        embeddings = model.model.embed_tokens(input_ids)
        expected, _ = model.model.routers[0](model.model.routers[0].features(embeddings, None)[0])
    torch.testing.assert_close(out.router_logits[0], expected.reshape(-1, 2))
    with pytest.raises(ValueError, match=r"PMoEConfig.router_input_layer must be an integer in \[0, num_shallow_layers\]"):
        make_pmoe(router_input_layer=3)


# ------------------------------------------------------------------------ bounded key fitting (no pre-pass tax)
def shallow_calls(model):
    """Counts the forwards of layer 0 (two per training step while the expert-free pass runs, one after)."""
    calls = []
    model.model.layers[0].register_forward_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("keys", ["lda", "gaussian"])
def test_a_key_fitted_on_enough_sequences_stops_the_expert_free_pass_and_changes_nothing_else(keys):
    bounded = make_pmoe(router_keys=keys, router_fit_sequences=12)
    unbounded = make_pmoe(router_keys=keys, router_fit_sequences=None)
    for model in (bounded, unbounded):
        model.add_expert("a")
        model.add_expert("b")
        randomize_experts(model, [0])
        model.train()  # no dropout in the tiny config: forwards are deterministic
    unbounded.load_state_dict(bounded.state_dict())
    calls = shallow_calls(bounded)
    for step in range(4):  # batches of 8: the key has seen 8, 16 (>= 12: enough), then stops growing
        input_ids, labels = task_batch(1, seed=step)
        calls.clear()
        logits = bounded(input_ids=input_ids, labels=labels).logits
        assert len(calls) == (2 if step < 2 else 1)
        assert torch.equal(logits, unbounded(input_ids=input_ids, labels=labels).logits)  # same forced gate
    key = bounded.model.routers[0].experts[1]
    assert key.count == 16 and unbounded.model.routers[0].experts[1].count == 32
    assert bounded.model.routers[0].usage.tolist() == unbounded.model.routers[0].usage.tolist()  # usage still counted
    assert bounded.model.routers[0].experts[0].count == unbounded.model.routers[0].experts[0].count  # old key as it was


def test_the_bound_is_per_key_and_rechecked_after_loading_statistics():
    model = make_pmoe(router_fit_sequences=8)
    model.add_expert("a")
    model.train()
    calls = shallow_calls(model)
    input_ids, labels = task_batch(0)
    model(input_ids=input_ids, labels=labels)
    calls.clear()
    model(input_ids=input_ids, labels=labels)
    assert len(calls) == 1  # fitted enough
    model.add_expert("b")  # a new task: its key is empty, so the pass runs again
    calls.clear()
    model(input_ids=input_ids, labels=labels)
    assert len(calls) == 2
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["model.routers.0.experts.1.count"].zero_()  # e.g. resuming from an earlier checkpoint of the task
    state["model.routers.0.experts.1.feature_sum"].zero_()
    state["model.routers.0.experts.1.feature_outer_sum"].zero_()
    model(input_ids=input_ids, labels=labels)
    model.load_state_dict(state)
    calls.clear()
    model(input_ids=input_ids, labels=labels)
    assert len(calls) == 2 and model.model.routers[0].experts[1].count == 8


def test_distillation_and_router_logits_keep_the_expert_free_pass():
    model = make_pmoe(router_fit_sequences=1, distillation_alpha=0.5)
    model.add_expert("a")
    model.add_expert("b")
    randomize_experts(model, [0])
    model.train()
    calls = shallow_calls(model)
    for _ in range(2):
        input_ids, labels = task_batch(1)
        calls.clear()
        model(input_ids=input_ids, labels=labels)
        assert len(calls) == 3  # expert-free pass (the old model's gate needs its logits), main and old-model passes
    calls.clear()
    model.model(input_ids=input_ids, output_router_logits=True)
    assert len(calls) == 2


def test_packed_rows_count_their_sequences_without_the_pass():
    model = make_pmoe(router_fit_sequences=1)
    model.add_expert("a")
    model.train()
    input_ids, labels = task_batch(0, batch=1)
    model(input_ids=input_ids, labels=labels)  # fits the key
    usage = model.model.routers[0].usage.clone()
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]])  # three packed sequences
    model(input_ids=input_ids, labels=labels, position_ids=position_ids)
    assert model.model.routers[0].usage[0] == usage[0] + 3


@pytest.mark.parametrize("keys", ["lda", "gaussian"])
def test_a_fitting_pass_fits_what_training_forwards_fit_and_closes_the_key(keys):
    stepwise, passed = (make_pmoe(router_keys=keys, router_fit_sequences=None) for _ in range(2))
    for model in (stepwise, passed):
        model.add_expert("a")
        model.add_expert("b")
        randomize_experts(model, [0])
    batches = [task_batch(1, seed=seed) for seed in range(3)]
    stepwise.train()
    with torch.no_grad():
        for input_ids, _ in batches:  # no labels: every token routes, the pass runs every column
            stepwise(input_ids=input_ids)
    assert passed.fit_router_key([{"input_ids": input_ids} for input_ids, _ in batches]) == 24
    fitted, expected = passed.model.routers[0].experts[1], stepwise.model.routers[0].experts[1]
    for name in fitted.statistics:  # the same expert-free features, in the same batches: bit for bit
        assert torch.equal(getattr(fitted, name), getattr(expected, name)), name
    assert fitted.closed and not expected.closed and not passed.training

    # With labels only the prompt routes, and the columns after it are not run: the same statistics up to rounding.
    labelled = make_pmoe(router_keys=keys)
    labelled.add_expert("b")
    labelled.fit_router_key({"input_ids": ids, "labels": labels} for ids, labels in batches)
    reference = make_pmoe(router_keys=keys, router_fit_sequences=None)
    reference.add_expert("b")
    fit_task(reference, 0, 1, batches=3)
    for name in fitted.statistics:
        torch.testing.assert_close(getattr(labelled.model.routers[0].experts[0], name),
                                   getattr(reference.model.routers[0].experts[0], name), rtol=1e-5, atol=1e-5)

    # A closed key takes no more features, and training forwards skip the expert-free pass: one forward of layer 0
    # per step although the key has seen fewer than router_fit_sequences (2048) sequences.
    passed.train()
    calls = shallow_calls(passed)
    counts = fitted.count.clone()
    passed(input_ids=batches[0][0], labels=batches[0][1])
    assert len(calls) == 1 and torch.equal(fitted.count, counts)


def test_fit_router_key_refuses_what_it_cannot_fit():
    model = make_pmoe(router_keys="learned")
    model.add_expert("a")
    with pytest.raises(ValueError, match="fits the one router's LDA / Gaussian key"):
        model.fit_router_key([])
    model = make_pmoe()
    with pytest.raises(IndexError, match=r"needs an expert of this model \(it has 0\)"):
        model.fit_router_key([])
    model.add_expert("a")
    with pytest.raises(ValueError, match="needs batches with `input_ids` tensors"):
        model.fit_router_key([{"labels": torch.zeros(2, 3, dtype=torch.long)}])
    assert model.fit_router_key([]) == 0 and not model.model.routers[0].experts[0].closed  # nothing fitted: still open


def test_an_old_tasks_outputs_stay_bit_identical_when_a_new_task_is_fitted():
    # Fitting a new LDA key moves every old score (the covariance is shared), but with the default gate floor a
    # confidently routed prompt keeps its own expert alone, at gate exactly 1: the old task's logits do not move a bit.
    model = make_pmoe()

    def grow_and_fit(task):
        model.add_expert(f"task-{task}")
        randomize_experts(model, indices=[task], seed=task + 3)  # trained-looking LoRA weights...
        key = model.model.routers[0].experts[task]
        for statistic in key.statistics:  # ...and a key fitted on the task's own prompts only
            getattr(key, statistic).zero_()
        fit_task(model, task, task)

    grow_and_fit(0)
    prompts = task_batch(0, seed=99)[0][:, :8]
    with torch.no_grad():
        before = model(input_ids=prompts)
    grow_and_fit(1)
    with torch.no_grad():
        after = model(input_ids=prompts)
    assert torch.equal(after.routing_weights[:, 0], torch.ones(8)) and not after.routing_weights[:, 1].any()
    assert torch.equal(before.logits, after.logits)


# ------------------------------------------------------------------ the embedding screen (router_screen_margin)
def without_screen(model):
    """The same model, weights and keys, with `router_screen_margin=None` (no screen)."""
    config = model.config
    copy = make_pmoe(router_keys=config.router_keys, router_screen_margin=None, num_experts=config.num_experts,
                     expert_tasks=config.expert_tasks)
    copy.load_state_dict({k: v for k, v in model.state_dict().items() if "screen_router" not in k})
    return copy


def test_the_screen_routes_a_sure_prompt_without_the_pass_and_changes_no_output():
    screened = screened_model()
    unscreened = without_screen(screened)
    for task in range(3):
        screen, key = screened.model.screen_router.experts[task], screened.model.routers[0].experts[task]
        assert screen.count == key.count == 32  # fitted on the same sequences
    calls = shallow_calls(screened)
    with torch.no_grad():
        for task in range(3):
            prompts = task_batch(task, seed=99)[0][:, :8]
            calls.clear()
            out = screened(input_ids=prompts)
            assert len(calls) == 1  # only the model's own forward of layer 0: no expert-free pass
            reference = unscreened(input_ids=prompts)
            assert (out.routing_weights.argmax(-1) == task).all()
            assert torch.equal(out.routing_weights, reference.routing_weights)  # one expert at gate 1 either way
            assert torch.equal(out.logits, reference.logits)
            screened.config.router_screen_margin = None  # the screen off: the pass runs
            calls.clear()
            assert torch.equal(screened(input_ids=prompts).logits, reference.logits) and len(calls) == 2
            screened.config.router_screen_margin = 20.0


def test_only_the_unsure_rows_take_the_pass_and_every_row_keeps_its_own_gate():
    model = screened_model()
    sure = task_batch(0, seed=99, batch=1)[0][:, :8]
    unsure = torch.cat([task_batch(1, seed=98, batch=1)[0][:, :4], task_batch(2, seed=98, batch=1)[0][:, :4]], dim=1)
    embeds = model.model.embed_tokens(torch.cat([sure, unsure]))
    screen = model.model._screen_decision(model.model.screen_router, embeds, None)
    assert screen[0].tolist() == [True, False]  # two tasks' tokens: the screen is not sure
    rows_seen = []  # the batch size of each forward of layer 0
    model.model.layers[0].register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[0]))
    with torch.no_grad():
        both = model(input_ids=torch.cat([sure, unsure]))
        assert rows_seen == [1, 2]  # the expert-free pass for the unsure row only, then the model's forward
        for row, prompt in enumerate((sure, unsure)):
            alone = model(input_ids=prompt)
            assert torch.equal(both.routing_weights[row], alone.routing_weights[0])
            torch.testing.assert_close(both.logits[row], alone.logits[0])
        # Left padding: rows of other lengths, each routed from its own real tokens.
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), sure[:, :5]], dim=1)
        mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
        mixed = model(input_ids=torch.cat([padded, unsure]), attention_mask=mask)
        assert rows_seen[-2:] == [1, 2]
        alone = model(input_ids=sure[:, :5])
        assert torch.equal(mixed.routing_weights[0], alone.routing_weights[0])
        torch.testing.assert_close(mixed.logits[0, 3:], alone.logits[0])
        assert torch.equal(mixed.routing_weights[1], both.routing_weights[1])
        model.config.router_screen_margin = None
        assert torch.equal(model(input_ids=unsure).routing_weights, both.routing_weights[1:])  # the boundary's gate


def test_the_screen_stays_off_until_every_fitted_expert_has_a_screen_key():
    # A checkpoint saved before the screen has none of its keys; a task trained after it fits only its own.
    model = screened_model()
    reference = without_screen(model)
    for statistic in model.model.screen_router.experts[0].statistics:
        getattr(model.model.screen_router.experts[0], statistic).zero_()
    calls = shallow_calls(model)
    with torch.no_grad():
        for task in range(3):
            prompts = task_batch(task, seed=99)[0][:, :8]
            calls.clear()
            assert torch.equal(model(input_ids=prompts).logits, reference(input_ids=prompts).logits)
            assert len(calls) == 2


def test_training_forwards_fit_the_screen_key_with_the_boundary_key_and_growth_merging_keep_it_in_step():
    model = make_pmoe(router_fit_sequences=16)
    model.add_expert("a")
    model.train()
    for seed in range(3):  # 8, 16 (enough), then no more
        input_ids, labels = task_batch(0, seed=seed)
        model(input_ids=input_ids, labels=labels)
    assert model.model.screen_router.experts[0].count == model.model.routers[0].experts[0].count == 16
    assert model.model.first_layer_screen_router.experts[0].count == 16
    model.add_expert("b")
    fit_task(model, 1, 1)
    model.add_expert("c")
    assert len(model.model.screen_router.experts) == 3 and model.model.screen_router.experts[2].count == 0
    expected = model.model.screen_router.experts[0].count + model.model.screen_router.experts[1].count
    first, second, target = model.merge_experts(sources=(0, 1), target=0)
    assert model.model.screen_router.experts[target].count == expected
    assert model.model.first_layer_screen_router.experts[target].count == expected
    model.remove_expert(1)
    assert len(model.model.screen_router.experts) == len(model.model.routers[0].experts) == 2
    assert len(model.model.first_layer_screen_router.experts) == 2


def layer_rows(model, layer_idx):
    """The batch size of each forward of layer `layer_idx` (expert-free pass and the model's own forward alike)."""
    rows = []
    model.model.layers[layer_idx].register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    return rows


def tie_screen_keys(screen, source, target):
    """`target`'s key in `screen` becomes a copy of `source`'s: the screen cannot tell the two tasks apart."""
    for statistic in screen.experts[source].statistics:
        getattr(screen.experts[target], statistic).copy_(getattr(screen.experts[source], statistic))


def test_the_first_layer_screen_routes_what_the_embedding_screen_leaves_and_stops_the_pass():
    model = screened_model()
    reference = without_screen(model)
    for task in range(3):  # fitted by `fit_router_key` on the same sequences as the boundary key
        assert model.model.first_layer_screen_router.experts[task].count == model.model.routers[0].experts[task].count
    for task in (1, 2):  # the embedding screen sees the three tasks as one: never sure of any
        tie_screen_keys(model.model.screen_router, 0, task)
    first, second = layer_rows(model, 0), layer_rows(model, 1)
    with torch.no_grad():
        for task in range(3):
            prompts = task_batch(task, seed=99)[0][:, :8]
            first.clear(), second.clear()
            out = model(input_ids=prompts)
            assert first == [8, 8] and second == [8]  # layer 0 of the pass, then the model: the pass stopped there
            assert (out.routing_weights.argmax(-1) == task).all()
            expected = reference(input_ids=prompts)
            assert torch.equal(out.routing_weights, expected.routing_weights)  # one expert at gate 1 either way
            assert torch.equal(out.logits, expected.logits)
        model.config.router_first_layer_screen = False  # turned off at once: the whole pass runs
        second.clear()
        assert torch.equal(model(input_ids=prompts).logits, expected.logits) and second == [8, 8]


def test_in_a_batch_each_row_stops_at_the_first_screen_sure_of_it_and_keeps_its_own_gate():
    model = screened_model()
    tie_screen_keys(model.model.screen_router, 1, 2)  # tasks 1 and 2 look alike on the embeddings
    sure = task_batch(0, seed=99, batch=1)[0][:, :8]  # the embedding screen is sure of it
    second_screen = task_batch(1, seed=99, batch=1)[0][:, :8]  # the first-layer screen is
    mixed = torch.cat([task_batch(1, seed=98, batch=1)[0][:, :4], task_batch(2, seed=98, batch=1)[0][:, :4]], dim=1)
    first, second = layer_rows(model, 0), layer_rows(model, 1)
    batch = torch.cat([sure, second_screen, mixed])
    with torch.no_grad():
        both = model(input_ids=batch)
        assert first == [2, 3] and second == [1, 3]  # the pass: layer 0 for two rows, layer 1 for the last one only
        for row, prompt in enumerate((sure, second_screen, mixed)):
            alone = model(input_ids=prompt)
            assert torch.equal(both.routing_weights[row], alone.routing_weights[0])
            torch.testing.assert_close(both.logits[row], alone.logits[0])
        model.config.router_screen_margin = None  # every row at the boundary: the same gates
        assert torch.equal(model(input_ids=batch).routing_weights[:2], both.routing_weights[:2])


def test_the_first_layer_screen_stays_off_until_complete_and_a_checkpoint_without_it_loads(tmp_path):
    model = screened_model()
    reference = without_screen(model)
    for task in (1, 2):  # the embedding screen is never sure: only the first-layer screen could skip the pass
        tie_screen_keys(model.model.screen_router, 0, task)
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    for statistic in model.model.first_layer_screen_router.experts[0].statistics:
        getattr(model.model.first_layer_screen_router.experts[0], statistic).zero_()
    second = layer_rows(model, 1)
    prompts = task_batch(0, seed=99)[0][:, :8]
    with torch.no_grad():
        assert torch.equal(model(input_ids=prompts).logits, reference(input_ids=prompts).logits)
        assert second == [8, 8]  # the whole pass ran
    # A checkpoint saved before the first-layer screen (none of its tensors) loads, and routes through the rest.
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "first_layer_screen_router" not in k},
              folder / "model.safetensors", metadata={"format": "pt"})
    loaded = PMoEForCausalLM.from_pretrained(folder).eval()
    assert all(key.count == 0 for key in loaded.model.first_layer_screen_router.experts)
    second = layer_rows(loaded, 1)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=prompts).logits, reference(input_ids=prompts).logits)
        assert second == [8, 8]
    # Its experts get first-layer keys from their tasks' data, the other keys untouched: the screen routes again.
    before = {name: tensor.clone() for name, tensor in loaded.state_dict().items() if "first_layer" not in name}
    batches = {task: [dict(zip(("input_ids", "labels"), task_batch(task, seed=seed))) for seed in range(4)]
               for task in range(3)}
    second.clear()
    for task in range(3):
        assert loaded.fit_router_key(batches[task], expert=task, missing_screen_keys_only=True) == 32
        assert loaded.fit_router_key(batches[task], expert=task, missing_screen_keys_only=True) == 0  # none missing
    assert all(torch.equal(tensor, before[name]) for name, tensor in loaded.state_dict().items() if name in before)
    for task in (1, 2):  # (task 0's key in `model` was zeroed above)
        assert torch.equal(loaded.model.first_layer_screen_router.experts[task].feature_outer_sum,
                           model.model.first_layer_screen_router.experts[task].feature_outer_sum)
    assert second == []  # fitting the first-layer keys ran layer 0 of the pass only
    second.clear()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=prompts).logits, reference(input_ids=prompts).logits)
        assert second == [8]  # the first-layer screen routed: layer 1 ran once
    loaded.add_expert("new")
    with pytest.raises(ValueError, match=r"expert 3's router key is not fitted yet; fit it first"):
        loaded.fit_router_key(batches[0], expert=3, missing_screen_keys_only=True)


def test_no_screen_where_the_pass_is_not_run():
    assert make_pmoe(expert_layers="deep").model.screen_router is None
    assert make_pmoe(router_input_layer=0).model.screen_router is None
    assert make_pmoe(router_keys="learned").model.screen_router is None
    assert make_pmoe(router_keys="gaussian").model.screen_router is None
    assert make_pmoe(router_screen_margin=None).model.screen_router is None
    # The first-layer screen needs a pass of at least two layers (one to read, one or more to skip), or is turned off.
    assert make_pmoe().model.first_layer_screen_router is not None
    assert make_pmoe(router_input_layer=1).model.first_layer_screen_router is None
    assert make_pmoe(router_input_layer=1).model.screen_router is not None
    assert make_pmoe(router_first_layer_screen=False).model.first_layer_screen_router is None
    assert make_pmoe(router_screen_margin=None).model.first_layer_screen_router is None
    with pytest.raises(ValueError, match=r"router_first_layer_screen must be True or False"):
        make_pmoe(router_first_layer_screen="yes")
    with pytest.raises(ValueError, match=r"router_screen_margin must be None \(no screen\) or a finite number > 0"):
        make_pmoe(router_screen_margin=0)
