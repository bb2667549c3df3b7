"""The growth API on every head (`growth_pmoe`): freezing policy, merging experts by usage (Park 2024), capping."""

import pytest
import torch
from transformers import Trainer

from pmoe import PMoEContinualCallback, PMoEEmbedding
from pmoe.growth_pmoe import best_low_rank_factors

from helpers import grown_pmoe, make_pmoe, randomize_experts, task_dataset, training_args, without_task


# ------------------------------------------------------------------------------------------- merging (Park 2024)
def test_svd_merge_is_the_best_rank_r_approximation_of_the_summed_deltas():
    model = grown_pmoe(3)
    randomize_experts(model)
    before = {
        id(linear): [(e.lora_A.clone(), e.lora_B.clone()) for e in linear.experts] for linear in model.expert_modules()
    }
    assert any(isinstance(module, PMoEEmbedding) for module in model.expert_modules())  # merged too
    first, second, target = model.merge_experts(method="svd", sources=(0, 1), target=2)
    assert (first, second, target) == (0, 1, 2)
    rank = model.config.expert_rank
    for linear in model.expert_modules():
        (a0, b0), (a1, b1), _ = before[id(linear)]
        summed = b0 @ a0 + b1 @ a1
        u, singular_values, vh = torch.linalg.svd(summed)
        best = u[:, :rank] @ torch.diag(singular_values[:rank]) @ vh[:rank]
        merged = linear.experts[2].lora_B @ linear.experts[2].lora_A
        torch.testing.assert_close(merged, best, rtol=1e-4, atol=1e-5)
        # Eckart-Young: the error is the energy of the dropped singular values.
        error = torch.linalg.matrix_norm(summed - merged)
        torch.testing.assert_close(error, singular_values[rank:].square().sum().sqrt(), rtol=1e-3, atol=1e-5)
        # The sources are untouched.
        assert torch.equal(linear.experts[0].lora_A, a0) and torch.equal(linear.experts[1].lora_B, b1)
    assert model.config.expert_tasks == ["task-0", "task-1", "task-0+task-1"]
    router = model.model.routers[0]
    assert router.experts[2].count == router.experts[0].count + router.experts[1].count


def test_average_merge_and_choice_by_usage():
    model = grown_pmoe(4)
    randomize_experts(model)
    with torch.no_grad():
        model.model.routers[0].usage.copy_(torch.tensor([5.0, 1.0, 9.0, 7.0]))
    model.training_expert = None
    expected = [((e2.lora_A + e3.lora_A) / 2, (e2.lora_B + e3.lora_B) / 2)
                for linear in model.expert_modules() for e2, e3 in [(linear.experts[2], linear.experts[3])]]
    assert model.merge_experts(method="average") == (2, 3, 1)  # two most used into the least used
    for (lora_a, lora_b), linear in zip(expected, model.expert_modules()):
        assert torch.equal(linear.experts[1].lora_A, lora_a) and torch.equal(linear.experts[1].lora_B, lora_b)
    assert model.model.routers[0].usage[1] == 16.0


def test_best_low_rank_factors_pad_small_matrices():
    delta = torch.randn(3, 2)
    lora_a, lora_b = best_low_rank_factors(delta, rank=4)
    assert lora_a.shape == (4, 2) and lora_b.shape == (3, 4)
    torch.testing.assert_close(lora_b @ lora_a, delta, rtol=1e-4, atol=1e-5)


def test_bad_merge_requests():
    model = grown_pmoe(2)
    with pytest.raises(ValueError, match="at least 3 experts"):
        model.merge_experts()
    with pytest.raises(ValueError, match="method must be"):
        model.merge_experts(method="mean")
    with pytest.raises(ValueError, match="two different experts"):
        model.merge_experts(sources=(1, 1), target=0)
    with pytest.raises(ValueError, match="merge_every_n_steps must be"):
        PMoEContinualCallback(merge_every_n_steps=0)


def test_usage_is_counted_in_training_and_saved(tmp_path):
    model = make_pmoe()
    Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(0)),
            callbacks=[PMoEContinualCallback(tasks=["task-0"])]).train()
    assert model.expert_usage().tolist() == [16.0]  # 4 steps x 4 sequences, all routed to the trained expert
    model.save_pretrained(tmp_path / "saved")
    reloaded = type(model).from_pretrained(tmp_path / "saved")
    assert reloaded.expert_usage().tolist() == [16.0]


def test_callback_merges_every_n_steps_and_training_continues(tmp_path):
    model = grown_pmoe(3)
    callback = PMoEContinualCallback(tasks=["task-0", "task-1", "task-2", "task-3"], merge_every_n_steps=2)
    trainer = Trainer(model, training_args(tmp_path), train_dataset=without_task(task_dataset(3)), callbacks=[callback])
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any("+" in task for task in model.config.expert_tasks)
    assert model.config.expert_tasks[3] == "task-3"  # the expert being trained is never overwritten
    assert any(torch.count_nonzero(p) for n, p in model.expert_parameters(3).items() if n.endswith("lora_B"))


def test_the_growth_api_is_on_every_head():
    """Merge / remove / cap / usage are the same mixin on the model, the causal LM and the classifier."""
    from pmoe import PMoEForSequenceClassification, PMoEModel
    from helpers import tiny_pmoe_config

    for model_class in (PMoEModel, PMoEForSequenceClassification):
        torch.manual_seed(0)
        model = model_class(tiny_pmoe_config(num_labels=3))
        for task in ("a", "b", "c", "d"):
            model.add_expert(task)
        randomize_experts(model)
        model.training_expert = None
        with torch.no_grad():
            for router in model.expert_routers():
                router.usage.copy_(torch.tensor([5.0, 4.0, 1.0, 0.0]))
        assert model.expert_usage().tolist() == [5.0, 4.0, 1.0, 0.0]
        assert model.cap_experts(3) == [("a", "b")]
        assert model.config.expert_tasks == ["a+b", "c", "d"] and len(model.expert_routers()[0].experts) == 3
        model.remove_expert(2)
        assert model.config.num_experts == 2
        assert all(len(module.experts) == 2 for module in model.expert_modules())


def test_add_expert_and_the_callback_share_one_freeze_policy():
    """`set_trainable` is the policy: after add_expert, exactly the new expert (and the classifier head) train."""
    from pmoe import PMoEForSequenceClassification
    from pmoe.growth_pmoe import set_trainable
    from helpers import tiny_pmoe_config

    model = PMoEForSequenceClassification(tiny_pmoe_config(num_labels=2))
    model.add_expert("a")
    model.add_expert("b")
    after_add = {name: param.requires_grad for name, param in model.named_parameters()}
    assert {name.split(".")[0] for name, trainable in after_add.items() if trainable and "experts" not in name} == {
        "score"}
    assert all(".experts.1." in name for name, trainable in after_add.items() if trainable and name != "score.weight")
    set_trainable(model, [1])  # what the callback does when a task resumes
    assert {name: param.requires_grad for name, param in model.named_parameters()} == after_add
    model.add_expert("c", freeze_previous=False)  # earlier experts stay as they were
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any(".experts.1." in name for name in trainable) and any(".experts.2." in name for name in trainable)
    assert not any(".experts.0." in name for name in trainable)
