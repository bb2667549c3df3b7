"""`pmoe convert / add-expert / info / report`: in-process through `main`, plus real subprocesses for exit codes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import pmoe
from helpers import REMOTE_CODE_FILES, make_dense, make_pmoe, randomize_experts
from pmoe.cli import main
from pmoe.tasks import char_tokenizer


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COMMANDS = ["convert", "add-expert", "info", "report", "demo"]


def run_cli(capsys, *argv):
    """`(exit code, stdout, stderr)` of `pmoe *argv` run in this process."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err, command, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pmoe {command}: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def is_png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_MAGIC


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense") / "llama"
    make_dense("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A saved PMoE with two experts whose Gaussian keys were fitted on 10 sequences each and known router usage."""
    model = make_pmoe()
    model.add_expert("sql")
    model.add_expert("chat")
    randomize_experts(model)
    with torch.no_grad():
        model.expert_routers()[0].usage.copy_(torch.tensor([3.0, 1.0]))
    model.config.expert_train_steps = [30, 10]
    folder = tmp_path_factory.mktemp("trained") / "pmoe"
    model.save_pretrained(folder)
    return folder, model


# ------------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: pmoe {command}" in text and "examples:" in text and f"pmoe {command}" in text.split("examples:")[1]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS)


# ------------------------------------------------------------------------------------------------ convert
def test_convert_gives_a_remote_code_checkpoint_with_the_dense_logits(dense_dir, tmp_path, capsys):
    output = tmp_path / "converted"
    code, out, err = run_cli(capsys, "convert", str(dense_dir), str(output), "--num-shallow-layers", "1",
                             "--expert-rank", "4")
    assert code == 0, err
    assert "layers 0 shallow" in out and "1-3 deep" in out and "max |logit diff|" in out and "tokenizer: copied" in out
    assert {"config.json", "model.safetensors", *REMOTE_CODE_FILES, "tokenizer.json"} <= set(os.listdir(output))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no staging folder left behind

    loaded = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True).eval()
    assert type(loaded).__name__ == "PMoEForCausalLM" and loaded.config.num_experts == 0
    assert loaded.config.num_shallow_layers == 1 and loaded.config.expert_rank == 4
    dense = make_dense("llama")
    input_ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, dense(input_ids=input_ids).logits,
                                   rtol=0, atol=1e-5)

    code, out, _ = run_cli(capsys, "info", str(output))
    assert code == 0 and "llama (LlamaForCausalLM)" in out and "experts: none yet" in out


def test_convert_without_tokenizer_and_with_options(tmp_path, capsys):
    source = tmp_path / "qwen2"
    make_dense("qwen2").save_pretrained(source)
    code, out, err = run_cli(capsys, "convert", str(source), str(tmp_path / "out"), "--expert-layers", "all",
                             "--routing", "sequence", "--dtype", "float32")
    assert code == 0, err
    assert "tokenizer: none found" in out and "experts will go in layers 0-3" in out
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()
    assert pmoe.PMoEConfig.from_pretrained(tmp_path / "out").expert_layers == "all"


# ------------------------------------------------------------------------------------------------ add-expert / info
def test_add_expert_twice_in_place_then_info(dense_dir, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    assert run_cli(capsys, "convert", str(dense_dir), str(checkpoint), "--expert-rank", "2")[0] == 0
    (checkpoint / "README.md").write_text("my notes")
    for task in ("support-tickets", "sql"):
        code, out, err = run_cli(capsys, "add-expert", str(checkpoint), task)
        assert code == 0, err
        assert f"for task {task!r}" in out
    assert (checkpoint / "README.md").read_text() == "my notes"  # other files survive the in-place update
    assert (checkpoint / "tokenizer.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging or backup folder left behind

    model = pmoe.PMoEForCausalLM.from_pretrained(checkpoint)
    assert model.config.expert_tasks == ["support-tickets", "sql"]
    code, out, _ = run_cli(capsys, "info", str(checkpoint))
    assert code == 0
    assert "experts (2):" in out and "support-tickets" in out and "sql" in out

    code, out, _ = run_cli(capsys, "info", str(checkpoint), "--json")
    summary = json.loads(out)
    assert [expert["task"] for expert in summary["experts"]] == ["support-tickets", "sql"]
    assert summary["base_model_type"] == "llama" and summary["num_shallow_layers"] == 2
    assert summary["experts"][1]["trainable_parameters"] == sum(
        param.numel() for param in model.expert_parameters(1).values()
    )

    # The same task again: the model refuses it, the checkpoint is untouched.
    code, _, err = run_cli(capsys, "add-expert", str(checkpoint), "sql")
    assert code == 1
    assert_one_error_line(err, "add-expert", "'sql' already has expert 1")
    assert pmoe.PMoEConfig.from_pretrained(checkpoint).expert_tasks == ["support-tickets", "sql"]


def test_add_expert_to_a_new_folder_leaves_the_source(trained_checkpoint, tmp_path, capsys):
    source, _ = trained_checkpoint
    code, out, err = run_cli(capsys, "add-expert", str(source), "math", "--output-dir", str(tmp_path / "grown"))
    assert code == 0, err
    assert pmoe.PMoEConfig.from_pretrained(source).expert_tasks == ["sql", "chat"]
    assert pmoe.PMoEConfig.from_pretrained(tmp_path / "grown").expert_tasks == ["sql", "chat", "math"]

    code, _, err = run_cli(capsys, "add-expert", str(source), "math2", "--output-dir", str(tmp_path / "grown"))
    assert code == 1
    assert_one_error_line(err, "add-expert", "not empty")


def test_add_expert_interrupted_while_saving_leaves_the_checkpoint(trained_checkpoint, tmp_path, capsys,
                                                                   monkeypatch):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(trained_checkpoint[0], checkpoint)
    before = {name: (checkpoint / name).read_bytes() for name in os.listdir(checkpoint)}

    def failing_save(self, directory, *args, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(pmoe.PMoEForCausalLM, "save_pretrained", failing_save)
    code, _, err = run_cli(capsys, "add-expert", str(checkpoint), "math")
    assert code == 1
    assert_one_error_line(err, "add-expert", "No space left on device")
    assert {name: (checkpoint / name).read_bytes() for name in os.listdir(checkpoint)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_info_reads_router_statistics_without_loading_weights(trained_checkpoint, capsys):
    folder, model = trained_checkpoint
    code, out, _ = run_cli(capsys, "info", str(folder), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["num_experts"] == 2 and summary["router_keys"] == "lda"
    assert [expert["key_samples"] for expert in summary["experts"]] == [[10.0], [10.0]]
    assert [expert["usage_share"] for expert in summary["experts"]] == [0.75, 0.25]
    assert [expert["train_steps"] for expert in summary["experts"]] == [30, 10]
    assert [expert["trainable_parameters"] for expert in summary["experts"]] == [
        sum(param.numel() for param in model.expert_parameters(index).values()) for index in range(2)
    ]
    assert summary["base_parameters"] == sum(param.numel() for param in model.base_parameters().values())
    assert summary["base_model_type"] is None  # not made by `pmoe convert`
    assert summary["router_screen_margin"] == 20.0  # the default layout has the embedding screen...
    assert summary["router_first_layer_screen"]  # ...and the first-layer screen

    code, out, _ = run_cli(capsys, "info", str(folder))
    assert "75.0%" in out and "25.0%" in out and "key fitted on (sequences)" in out and "not recorded" in out
    assert "reading layer 2; embedding and first-layer screens at margin 20" in out


def test_info_shows_the_versions_recorded_in_config_json(trained_checkpoint, tmp_path, capsys):
    import transformers

    folder, _ = trained_checkpoint
    code, out, _ = run_cli(capsys, "info", str(folder), "--json")
    summary = json.loads(out)
    assert code == 0
    assert summary["pmoe_version"] == pmoe.__version__
    assert summary["transformers_version"] == transformers.__version__
    code, out, _ = run_cli(capsys, "info", str(folder))
    assert f"saved by        pmoe {pmoe.__version__}, transformers {transformers.__version__}" in out

    # An older checkpoint: written by another pmoe, or before pmoe recorded its version; transformers' too.
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    config = json.loads((old / "config.json").read_text())
    config["pmoe_version"] = "0.0.9"
    (old / "config.json").write_text(json.dumps(config))
    code, out, _ = run_cli(capsys, "info", str(old))
    assert code == 0 and f"saved by        pmoe 0.0.9, transformers {transformers.__version__}" in out
    del config["pmoe_version"], config["transformers_version"]
    (old / "config.json").write_text(json.dumps(config))
    code, out, _ = run_cli(capsys, "info", str(old), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["pmoe_version"] is None and summary["transformers_version"] is None
    code, out, _ = run_cli(capsys, "info", str(old))
    assert "saved by        pmoe version not recorded, transformers version not recorded" in out


# ------------------------------------------------------------------------------------------------ report
DEMO_RESULTS = {
    "tasks": ["reverse", "add"],
    "baseline": [0.0, 0.0],
    "methods": {
        "PMoE (one expert per task)": {"matrix": [[0.5, 0.0], [0.5, 0.4]],
                                       "metrics": {"LA": 0.45, "OP": 0.45, "BWT": 0.0, "FWT": 0.0}},
        "sequential fine-tuning": {"matrix": [[0.9, 0.0], [0.1, 0.6]],
                                   "metrics": {"LA": 0.75, "OP": 0.35, "BWT": -0.8, "FWT": 0.0}},
    },
    "router_choice": [[0, 0], [1, 1]],
}
RUN_CONTINUAL_RESULTS = {
    "tasks": ["a", "b", "c"], "metric": "exact_match", "baseline": [0.0, 0.1, 0.0],
    "accuracy_matrix": [[0.5, 0.1, 0.0], [0.5, 0.6, 0.0], [0.4, 0.6, 0.7]],
    "num_tasks": 3, "LA": 0.6, "OP": 0.5667, "BWT": -0.05, "FWT": 0.0, "forgetting": [0.1, 0.0],
    "experts": ["a", "b", "c"], "expert_train_steps": [5, 5, 5],
}
BENCHMARK_RESULTS = {
    "args": {"seeds": [0, 1]},
    "tasks": ["reverse", "add"],
    "summary": {
        "pmoe": {"LA": {"mean": 0.16, "std": 0.01}, "OP": {"mean": 0.16, "std": 0.01},
                 "BWT": {"mean": 0.0, "std": 0.0}, "FWT": {"mean": 0.0, "std": 0.0}},
        "sequential-ft": {"LA": {"mean": 0.53, "std": 0.06}, "OP": {"mean": 0.09, "std": 0.0},
                          "BWT": {"mean": -0.59, "std": 0.08}},
        "multitask": {"LA": None, "OP": {"mean": 0.72, "std": 0.02}, "BWT": None},
    },
    "runs": {},
}


@pytest.mark.parametrize("name, results", [
    ("demo_results.json", DEMO_RESULTS),
    ("continual_results.json", RUN_CONTINUAL_RESULTS),
    ("continual.json", BENCHMARK_RESULTS),
])
def test_report_on_each_results_format(name, results, tmp_path, capsys):
    source = tmp_path / name
    source.write_text(json.dumps(results))
    figure = tmp_path / "figures" / "report.png"
    code, out, err = run_cli(capsys, "report", str(source), "--output", str(figure))
    assert code == 0, err
    assert is_png(figure) and figure.stat().st_size > 5_000
    assert f"wrote {figure}" in out

    # A folder holding the results file works too.
    code, _, err = run_cli(capsys, "report", str(tmp_path), "-o", str(tmp_path / "again.png"))
    assert code == 0, err
    assert is_png(tmp_path / "again.png")


def test_report_on_a_checkpoint(trained_checkpoint, tmp_path, capsys):
    folder, _ = trained_checkpoint
    figure = tmp_path / "router.png"
    code, out, err = run_cli(capsys, "report", str(folder), "-o", str(figure))
    assert code == 0, err
    assert is_png(figure) and "router usage" in out


# ------------------------------------------------------------------------------------------------ errors
def test_user_mistakes_are_one_line(dense_dir, trained_checkpoint, tmp_path, capsys):
    missing = str(tmp_path / "nope")
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=16)).save_pretrained(gpt2)
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    (tmp_path / "ragged.json").write_text(json.dumps({"accuracy_matrix": [[0.1, 0.2], [0.3]]}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something.txt").write_text("keep me")
    empty_pmoe = tmp_path / "empty-pmoe"
    make_pmoe().save_pretrained(empty_pmoe)
    cases = [
        (["info", missing], "info", ["no such file or directory"]),
        (["info", str(dense_dir)], "info", ["not a PMoE checkpoint", "'llama'", "pmoe convert"]),
        (["info", "nobody-here/no-such-model-123"], "info", ["nobody-here/no-such-model-123 is not a local folder"]),
        (["info", str(tmp_path / "broken.json")], "info", ["is a file"]),
        (["info", str(tmp_path / "full")], "info", ["not a model checkpoint (no config.json)"]),
        (["convert", missing, str(tmp_path / "o1")], "convert", ["no such file or directory"]),
        (["convert", str(gpt2), str(tmp_path / "o2")], "convert", ["'gpt2'", "supported: llama"]),
        (["convert", str(trained_checkpoint[0]), str(tmp_path / "o3")], "convert", ["already a PMoE checkpoint"]),
        (["convert", str(dense_dir), str(tmp_path / "o4"), "--num-shallow-layers", "4"], "convert",
         ["num_shallow_layers", "[0, 3]"]),
        (["convert", str(dense_dir), str(tmp_path / "full")], "convert", ["not empty"]),
        (["add-expert", missing, "x"], "add-expert", ["no such file or directory"]),
        (["add-expert", str(dense_dir), "x"], "add-expert", ["not a PMoE checkpoint"]),
        (["add-expert", str(trained_checkpoint[0]), "  "], "add-expert", ["non-empty task name"]),
        (["report", str(tmp_path / "missing.json"), "-o", "x.png"], "report", ["no such file"]),
        (["report", str(tmp_path / "broken.json"), "-o", "x.png"], "report", ["not valid JSON"]),
        (["report", str(tmp_path / "other.json"), "-o", "x.png"], "report", ["not a results file"]),
        (["report", str(tmp_path / "ragged.json"), "-o", "x.png"], "report", ["square"]),
        (["report", str(tmp_path / "list.json"), "-o", "x.png"], "report", ["JSON object"]),
        (["report", str(tmp_path / "full"), "-o", "x.png"], "report", ["neither a checkpoint"]),
        (["report", str(empty_pmoe), "-o", "x.png"], "report", ["no experts yet"]),
    ]
    for argv, command, fragments in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 1, (argv, out, err)
        assert_one_error_line(err, command, *fragments)
    assert not (tmp_path / "o4").exists() and not os.path.exists("x.png")
    assert (tmp_path / "full" / "something.txt").read_text() == "keep me"


@pytest.mark.parametrize("argv, fragment", [
    (["convert", "a", "b", "--expert-rank", "0"], "must be >= 1"),
    (["convert", "a", "b", "--num-shallow-layers", "two"], "not an integer"),
    (["convert", "a", "b", "--routing", "expert"], "invalid choice"),
    (["report", "results.json"], "--output"),
])
def test_bad_arguments_exit_2_with_one_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and fragment in err and err.startswith(f"pmoe {argv[0]}: error: ")


def test_real_processes_exit_codes_and_stderr(trained_checkpoint, tmp_path):
    folder, _ = trained_checkpoint
    # A repo id from an offline Hub cache (the layout huggingface_hub writes), read by `python -m pmoe info`.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--pmoe-test--tiny-pmoe"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-m", "pmoe", "info", "pmoe-test/tiny-pmoe", "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert [expert["task"] for expert in summary["experts"]] == ["sql", "chat"]
    assert [expert["key_samples"] for expert in summary["experts"]] == [[10.0], [10.0]]

    script = os.path.join(os.path.dirname(sys.executable), "pmoe")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "pmoe"]
    runs = [
        ([*command, "info", "pmoe-test/not-cached"], 1, "pmoe info: error: pmoe-test/not-cached is not a local folder"),
        ([*command, "convert", "x", "y", "--expert-rank", "zero"], 2, "pmoe convert: error: argument --expert-rank"),
    ]
    for argv, expected, prefix in runs:
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == expected, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
