"""Long task sequences: 50 experts grow linearly, save and load exactly, and merging caps the count."""

import pytest
import torch
from transformers import Trainer

import pmoe
from pmoe import PMoEContinualCallback

from helpers import make_pmoe, padded_batch, randomize_experts, task_dataset, training_args, without_task


def test_fifty_experts_grow_linearly_and_round_trip(tmp_path):
    model = make_pmoe()
    sizes = [sum(p.numel() for p in model.parameters())]
    for index in range(50):
        model.add_expert(f"task-{index}")
        sizes.append(sum(p.numel() for p in model.parameters()))
    per_expert = sum(p.numel() for p in model.expert_parameters(0).values())
    # As documented: 2 * r * (in + out) per targeted linear of every expert layer (a Gaussian key is buffers only).
    config = model.config
    h, i, r = config.hidden_size, config.intermediate_size, config.expert_rank
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    per_layer = r * ((h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h))
    per_embedding = r * (config.vocab_size + h)  # the embedding expert (in the default targets)
    assert per_expert == per_layer * len(config.expert_layer_indices) + per_embedding
    assert [b - a for a, b in zip(sizes, sizes[1:])] == [per_expert] * 50
    randomize_experts(model)
    model.save_pretrained(tmp_path / "fifty")
    loaded = pmoe.PMoEForCausalLM.from_pretrained(tmp_path / "fifty").eval()
    assert loaded.config.num_experts == 50 and loaded.config.expert_tasks[-1] == "task-49"
    input_ids, attention_mask = padded_batch(batch=2, length=7)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits,
                           model(input_ids=input_ids, attention_mask=attention_mask).logits)


def test_cap_experts_merges_and_removes():
    model = make_pmoe()
    for index in range(4):
        model.add_expert(f"task-{index}")
    randomize_experts(model)
    model.training_expert = None
    for router in model.expert_routers():
        router.usage.copy_(torch.tensor([5.0, 1.0, 7.0, 2.0]))  # experts 2 and 0 are the most used
    model.record_task_scores({"task-0": 0.5, "task-1": 0.25, "task-2": 1.0, "task-3": 0.0})
    deltas = {e: [l.experts[e].lora_B @ l.experts[e].lora_A for l in model.expert_linears()] for e in range(4)}
    statistics = [model.model.routers[0].experts[e].count.clone() for e in range(4)]

    assert model.cap_experts(3, method="average") == [("task-0", "task-2")]
    config = model.config
    assert config.num_experts == 3 and config.expert_tasks == ["task-0+task-2", "task-1", "task-3"]
    assert len(config.expert_train_steps) == 3 and config.accuracy_matrix == [[0.5, 0.25, 0.0]]
    assert all(len(linear.experts) == 3 for linear in model.expert_linears())
    assert torch.equal(model.model.routers[0].usage, torch.tensor([12.0, 1.0, 2.0]))
    assert model.model.routers[0].experts[0].count == statistics[0] + statistics[2]  # the key covers both tasks
    for linear, before in zip(model.expert_linears(), deltas[1]):  # the other experts are untouched, moved down
        assert torch.equal(linear.experts[1].lora_B @ linear.experts[1].lora_A, before)
    with torch.no_grad():
        model(input_ids=padded_batch(batch=2, length=5)[0])  # still runs, with 3 gates
    with pytest.raises(ValueError, match="max_experts must be an integer >= 1"):
        model.cap_experts(0)


def test_callback_caps_the_expert_count_at_each_new_task(tmp_path):
    model = make_pmoe()
    callback = PMoEContinualCallback(tasks=[f"task-{t}" for t in range(4)], max_experts=2)
    for task in range(4):
        Trainer(model, training_args(tmp_path, max_steps=1), train_dataset=without_task(task_dataset(task)),
                callbacks=[callback]).train()
        assert model.config.num_experts == min(task + 1, 2)
    assert model.config.expert_tasks[-1] == "task-3" and "+" in model.config.expert_tasks[0]
    assert model.training_expert == 1 and all(p.requires_grad for p in model.expert_parameters(1).values())
    assert not any(p.requires_grad for p in model.expert_parameters(0).values())
    with pytest.raises(ValueError, match="use it with `tasks=`"):
        PMoEContinualCallback(task_schedule=[("a", 1)], max_experts=2)
