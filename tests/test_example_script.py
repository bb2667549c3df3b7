"""examples/run_continual.py end to end on tiny offline data: jsonl, csv and TRACE-layout tasks."""

import csv
import json
import os
import subprocess
import sys

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pmoe.metrics import continual_metrics, exact_match


SCRIPT = os.path.join(os.path.dirname(__file__), "..", "examples", "run_continual.py")
ALPHABET = "abcdefgh:=> "


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(ALPHABET)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def examples(kind: str, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        word = "".join(ALPHABET[i] for i in torch.randint(0, 8, (3,), generator=generator).tolist())
        answer = word if kind == "copy" else word[::-1]
        rows.append({"prompt": f"{kind[:3]}:{word}=>", "answer": answer})
    return rows


def make_inputs(root):
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ))
    dense.save_pretrained(root / "dense")
    tokenizer.save_pretrained(root / "dense")
    with open(root / "copy.jsonl", "w") as handle:
        for row in examples("copy", 40, 0):
            handle.write(json.dumps(row) + "\n")
    with open(root / "reverse.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "answer"])
        writer.writeheader()
        writer.writerows(examples("reverse", 40, 1))
    trace = root / "TRACE-swap"
    trace.mkdir()
    (trace / "train.json").write_text(json.dumps(examples("swap", 36, 2)))
    (trace / "test.json").write_text(json.dumps(examples("swap", 4, 3)))


def test_run_continual_writes_the_accuracy_matrix_and_metrics(tmp_path):
    make_inputs(tmp_path)
    command = [
        sys.executable, SCRIPT, "--model_name_or_path", str(tmp_path / "dense"),
        "--tasks", str(tmp_path / "copy.jsonl"), str(tmp_path / "reverse.csv"), str(tmp_path / "TRACE-swap"),
        "--num_shallow_layers", "1", "--output_dir", str(tmp_path / "out"), "--max_steps", "3",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--max_new_tokens", "4",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "out" / "continual_results.json").read_text())
    assert results["tasks"] == ["copy", "reverse", "TRACE-swap"]
    assert results["experts"] == ["copy", "reverse", "TRACE-swap"]
    assert results["expert_train_steps"] == [3, 3, 3]
    assert len(results["accuracy_matrix"]) == 3 and all(len(row) == 3 for row in results["accuracy_matrix"])
    assert len(results["baseline"]) == 3
    for key in ("LA", "OP", "BWT", "FWT"):
        assert key in results
    assert results["OP"] == continual_metrics(results["accuracy_matrix"], results["baseline"])["OP"]
    assert (tmp_path / "out" / "final" / "modeling_pmoe.py").exists()


def test_bad_task_folder_is_reported(tmp_path):
    make_inputs(tmp_path)
    empty = tmp_path / "empty-task"
    empty.mkdir()
    command = [sys.executable, SCRIPT, "--model_name_or_path", str(tmp_path / "dense"), "--tasks", str(empty),
               "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "needs train.json and test.json" in result.stderr


# ------------------------------------------------------------------------------------------- metrics by hand
def test_continual_metrics_on_a_hand_computed_matrix():
    matrix = [
        [0.8, 0.1, 0.0],
        [0.7, 0.9, 0.2],
        [0.6, 0.8, 0.5],
    ]
    baseline = [0.0, 0.1, 0.1]
    metrics = continual_metrics(matrix, baseline)
    assert abs(metrics["LA"] - (0.8 + 0.9 + 0.5) / 3) < 1e-12
    assert abs(metrics["OP"] - (0.6 + 0.8 + 0.5) / 3) < 1e-12
    assert abs(metrics["BWT"] - ((0.6 - 0.8) + (0.8 - 0.9)) / 2) < 1e-12
    assert abs(metrics["FWT"] - ((0.1 - 0.1) + (0.2 - 0.1)) / 2) < 1e-12
    assert [round(value, 12) for value in metrics["forgetting"]] == [0.2, 0.1]


def test_exact_match_normalises():
    assert exact_match(["The Cat.", "dog"], ["cat", "dogs"]) == 0.5
    assert exact_match([], []) == 0.0
