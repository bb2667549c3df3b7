"""The generated Hub model card and the continual-learning record it shows."""

import pytest
from huggingface_hub import ModelCard
from transformers import Trainer

import pmoe
from pmoe import PMoEContinualCallback

from helpers import make_dense, task_dataset, training_args, without_task


@pytest.fixture
def grown(tmp_path):
    make_dense("llama").save_pretrained(tmp_path / "dense")
    model = pmoe.PMoEForCausalLM.from_dense(str(tmp_path / "dense"), num_shallow_layers=2, expert_rank=4)
    model.add_expert("support")
    model.add_expert("sql")
    model.config.expert_train_steps = [300, 120]
    return model, str(tmp_path / "dense")


def test_card_metadata_expert_table_results_and_usage(grown):
    model, dense_path = grown
    model.record_task_scores({"support": 0.9})
    model.record_task_scores({"support": 0.85, "sql": 0.5})
    card = ModelCard(str(model.model_card("org/pmoe-tiny", license="apache-2.0", tags=["mine"])))
    data = card.data.to_dict()
    assert data["base_model"] == dense_path
    assert data["library_name"] == "transformers" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-generation"
    assert data["tags"][0] == "mine" and {"pmoe", "continual-learning", "custom_code"} <= set(data["tags"])
    text = card.text
    per_expert = sum(p.numel() for p in model.expert_parameters(0).values())
    assert f"| 0 | support | {per_expert:,} | 300 |" in text
    assert f"| 1 | sql | {per_expert:,} | 120 |" in text
    assert "| trained up to | support | sql |" in text
    assert "| support | 90.0 | - |" in text and "| sql | 85.0 | 50.0 |" in text
    # LA = (90 + 50) / 2, OP = (85 + 50) / 2, BWT = 85 - 90.
    assert "LA 70.0 · OP 67.5 · BWT -5.0" in text
    assert 'AutoModelForCausalLM.from_pretrained("org/pmoe-tiny", trust_remote_code=True)' in text


def test_record_is_saved_with_the_model_and_checked(grown, tmp_path):
    model, _ = grown
    model.record_task_scores({"support": 0.5}, metric="exact_match")
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['chat'\]; the model's tasks are \['support', 'sql'\]"):
        model.record_task_scores({"chat": 0.1}, metric="exact_match")
    with pytest.raises(ValueError, match=r"the record holds 'exact_match' scores; got 'accuracy'"):
        model.record_task_scores({"sql": 0.1})
    assert model.config.accuracy_matrix == [[0.5, None]]  # refused calls changed nothing
    model.save_pretrained(tmp_path / "saved")
    loaded = pmoe.PMoEForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.config.accuracy_matrix == [[0.5, None]] and loaded.config.accuracy_metric == "exact_match"


def test_callback_records_one_row_per_task(tmp_path):
    model = pmoe.PMoEForCausalLM.from_dense(make_dense("llama"), num_shallow_layers=2, expert_rank=4)
    seen = []

    def evaluate_fn(model, tasks):
        seen.append(list(tasks))
        return {task: 0.25 * (index + 1) for index, task in enumerate(tasks)}

    callback = PMoEContinualCallback(tasks=["task-0", "task-1"], evaluate_fn=evaluate_fn, metric_name="exact_match")
    for task in (0, 1):
        Trainer(model, training_args(tmp_path, max_steps=2), train_dataset=without_task(task_dataset(task)),
                callbacks=[callback]).train()
    assert seen == [["task-0"], ["task-0", "task-1"]]
    assert model.config.accuracy_matrix == [[0.25], [0.25, 0.5]]
    assert "LA 37.5 · OP 37.5 · BWT +0.0" in str(model.model_card())
    with pytest.raises(ValueError, match="evaluate_fn must be callable"):
        PMoEContinualCallback(tasks=["a"], evaluate_fn="accuracy")
