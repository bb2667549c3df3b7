"""The same seed gives the same model on CPU: experts, router (Gaussian key statistics, usage counters), base weights
and outputs, whether the two runs share a process or not. Two tasks, one Trainer each, shuffled batches and expert
dropout, seeded only through TrainingArguments(seed=..., data_seed=...)."""

import pytest
import torch
from safetensors.torch import load_file

from pmoe import PMoEForCausalLM

from helpers import VOCAB
from processes.continual_child import finish, run_tasks, start_child


SEED = 3


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outputs(model):
    """Logits and greedy continuations of fixed prompts (task-0-like, task-1-like and random)."""
    prompts = torch.tensor([[3, 4, 5, 6, 7, 8], [23, 24, 25, 26, 27, 28], [50, 11, 90, 41, 7, 66]])
    assert int(prompts.max()) < VOCAB
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=prompts).logits
    tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, do_sample=False)
    return logits, tokens


def assert_same(first: dict, second: dict):
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


def test_same_seed_same_model_in_two_processes(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    # Both at once (one thread each): nothing but the seed is shared.
    children = [start_child(run / "out", "--mode", "tasks", "--seed", SEED, "--no-checkpoints",
                            "--final", run / "final", log=run.with_suffix(".log"))
                for run in runs]
    for child, run in zip(children, runs):
        finish(child, run.with_suffix(".log"))

    first, second = (load_file(run / "final" / "model.safetensors") for run in runs)
    assert_same(first, second)  # every expert, router key statistic, usage counter and base weight
    # Not trivially equal: both tasks trained and fitted their router keys.
    assert any(name.endswith("experts.1.lora_B") and torch.count_nonzero(t) for name, t in first.items())
    assert first["model.routers.0.experts.1.count"] > 0 and first["model.routers.0.usage"].sum() > 0

    models = [PMoEForCausalLM.from_pretrained(run / "final") for run in runs]
    assert models[0].config.expert_tasks == models[1].config.expert_tasks == ["task-0", "task-1"]
    assert models[0].config.expert_train_steps == models[1].config.expert_train_steps == [4, 4]
    (logits_a, tokens_a), (logits_b, tokens_b) = (outputs(model) for model in models)
    assert torch.equal(logits_a, logits_b) and torch.equal(tokens_a, tokens_b)


def test_same_seed_same_model_twice_in_one_process(tmp_path):
    first = run_tasks(tmp_path / "a", seed=SEED, data_seed=SEED)
    torch.rand(1000)  # whatever the global RNG did in between
    second = run_tasks(tmp_path / "b", seed=SEED, data_seed=SEED)
    assert_same(first.state_dict(), second.state_dict())
    assert first.config.expert_tasks == second.config.expert_tasks
    assert first.config.expert_train_steps == second.config.expert_train_steps == [4, 4]
    (logits_a, tokens_a), (logits_b, tokens_b) = outputs(first), outputs(second)
    assert torch.equal(logits_a, logits_b) and torch.equal(tokens_a, tokens_b)

    # The seed is what fixes them: another seed gives other experts.
    other = run_tasks(tmp_path / "c", seed=SEED + 1, data_seed=SEED + 1).state_dict()
    assert all(not torch.equal(tensor, other[name]) for name, tensor in first.state_dict().items()
               if name.endswith(("lora_A", "lora_B")))
