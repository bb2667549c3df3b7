"""Lifelong-MoE distillation to the old model: the old-model pass and the KL term."""

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

from pmoe import PMoEContinualCallback
from pmoe.experts_pmoe import route

from helpers import grown_pmoe, make_pmoe, task_batch, task_dataset, training_args, without_task


# ------------------------------------------------------------------------------------------- distillation
def test_distillation_adds_alpha_times_kl_to_the_old_model():
    model = grown_pmoe(2, distillation_alpha=0.5)
    input_ids, labels = task_batch(1)
    model.train()
    out = model(input_ids=input_ids, labels=labels)

    # The old model by hand: the same weights, the new expert masked out of the router's decision.
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, labels=labels, output_router_logits=True).router_logits[0]
        old_gates = route(logits.masked_fill(torch.tensor([False, True]), float("-inf")), "softmax", None)
        old_logits = model(input_ids=input_ids, routing_weights=old_gates).logits
        new_logits = model(input_ids=input_ids, routing_weights=torch.tensor([[0.0, 1.0]]).expand(8, 2)).logits
    trained = labels[:, 1:] != -100
    expected_kl = F.kl_div(
        F.log_softmax(new_logits[:, :-1][trained], -1), F.log_softmax(old_logits[:, :-1][trained], -1),
        log_target=True, reduction="batchmean",
    )
    torch.testing.assert_close(out.distillation_loss, expected_kl, rtol=1e-4, atol=1e-6)
    lm_loss = F.cross_entropy(new_logits[:, :-1].reshape(-1, new_logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + 0.5 * expected_kl, rtol=1e-4, atol=1e-6)
    assert old_gates[:, 0].min() > 0.99  # the old model really routes to the old expert


@pytest.mark.parametrize("expert_layers, expected", [
    ("deep", {0: 1, 1: 1, 2: 2, 3: 2}),  # shallow layers once, expert layers twice
    ("all", {0: 3, 1: 3, 2: 2, 3: 2}),  # + the expert-free pre-pass for the gate; every layer is an expert layer
])
def test_old_model_pass_reuses_the_shallow_block_and_needs_no_copy(expert_layers, expected):
    model = grown_pmoe(2, distillation_alpha=1.0, expert_layers=expert_layers)
    calls = {index: 0 for index in range(4)}
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: calls.__setitem__(index, calls[index] + 1))
    parameters_before = sum(p.numel() for p in model.parameters())
    model.train()
    input_ids, labels = task_batch(1)
    out = model(input_ids=input_ids, labels=labels)
    assert calls == expected
    assert sum(p.numel() for p in model.parameters()) == parameters_before
    out.loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.grad is not None}
    assert trainable == set(model.expert_parameters(1))


def test_no_distillation_in_eval_or_without_labels():
    model = grown_pmoe(2, distillation_alpha=1.0)
    input_ids, labels = task_batch(1)
    model.eval()
    assert model(input_ids=input_ids, labels=labels).distillation_loss is None
    model.train()
    assert model(input_ids=input_ids).distillation_loss is None


def test_distillation_runs_in_a_trainer(tmp_path):
    model = grown_pmoe(1)
    callback = PMoEContinualCallback(tasks=["task-0", "task-1"], distillation_alpha=0.3)
    trainer = Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(1)), callbacks=[callback])
    assert model.config.distillation_alpha == 0.3
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    with pytest.raises(ValueError, match="distillation_alpha must be a finite number >= 0"):
        PMoEContinualCallback(distillation_alpha=-1)
    with pytest.raises(ValueError, match="PMoEConfig.distillation_alpha must be"):
        make_pmoe(distillation_alpha=float("nan"))


