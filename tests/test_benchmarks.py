import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_speed_benchmark_quick_runs(tmp_path):
    # A routing-only results file as `cl_benchmark.py --routing-only` writes it: 10 prompts, 5 routed by the embedding
    # screen, 3 by the first-layer screen, 2 left to the boundary router (rows of other key kinds are ignored).
    routing = {"routing": {"1": {"lda": {"a": {"prompts": 10}},
                                 "lda + screens": {"a": {"prompts": 6, "screened": {"0": 4, "1": 1}},
                                                   "b": {"prompts": 4, "screened": {"0": 1, "1": 2}}}}}}
    (tmp_path / "routing.json").write_text(json.dumps(routing))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick", "--repeats", "1", "--no-memory",
         "--output-dir", str(tmp_path), "--routing-results", str(tmp_path / "routing.json")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "speed-quick.json").read_text())
    assert {"pmoe-1", "pmoe-4", "pmoe-4-all", "pmoe-4-unscreened"} <= set(results["inference"])
    assert results["inference"]["pmoe-4"]["experts_used"] == 1  # the prompt is routed to its task's expert
    assert results["inference"]["pmoe-4-all"]["experts_used"] == 4
    # The layers the expert-free pass ran: none where the embedding screen is sure of the prompt, one where the
    # first-layer screen is, both shallow layers where no screen is (equal keys, or screens off).
    passes = {name: row["expert_free_pass"] for name, row in results["inference"].items()}
    assert passes == {"peft-lora": None, "pmoe-1": 0, "pmoe-4": 0, "pmoe-4-all": 2, "pmoe-4-first-layer-screen": 1,
                      "pmoe-4-unscreened": 2}
    assert all(row["prefill_ratio"] > 0 and row["generate_prefill_ratio"] > 0 for row in results["inference"].values())
    # The real-text prefill: the three routed cases' ratios weighted by the file's shares (0.5, 0.3, 0.2).
    real_text = results["real_text_prefill"]["routing.json"]
    assert real_text["shares"] == {"embedding screen": 0.5, "first-layer screen": 0.3, "boundary router": 0.2}
    for kind in ("prefill", "generate_prefill"):
        ratios = [results["inference"][f"pmoe-4{case}"][f"{kind}_ratio"]
                  for case in ("", "-first-layer-screen", "-unscreened")]
        assert abs(real_text[f"{kind}_ratio"] - (0.5 * ratios[0] + 0.3 * ratios[1] + 0.2 * ratios[2])) < 1e-9
    assert {"full-finetuning", "peft-lora-all-layers", "pmoe", "pmoe-fitting-in-steps"} <= set(results["training"])
    assert results["key_fitting"]["pass_s_per_sequence"] > 0
    assert results["wall_seconds"] > 0
    assert results["per_task"]["parameters_added"] > 0
    assert "| pmoe-4-all | 4 of 4 |" in (tmp_path / "speed-quick.md").read_text()


def test_speed_benchmark_compares_models_that_share_the_llamas_weights():
    # PMoE and the PEFT peer compute with the Llama's own tensors (no copies), and their outputs are the Llama's
    # while no expert applies (PMoE without gates; PEFT's B at zero).
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import speed

    shape = dict(speed.QUICK, expert_layers="all")
    llama = speed.make_llama(shape, torch.device("cpu"), torch.float32)
    model, peft = speed.make_pmoe(llama, shape, 2, routed=False), speed.peft_lora(llama, shape).eval()
    weights = {name: tensor.data_ptr() for name, tensor in llama.state_dict().items()}
    in_pmoe = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    in_peft = {name.replace(".base_layer", ""): tensor.data_ptr()
               for name, tensor in peft.get_base_model().state_dict().items()}
    for name, pointer in weights.items():  # every Llama tensor, in both
        assert in_pmoe[name] == pointer and in_peft[name] == pointer, name
    input_ids = torch.randint(3, shape["vocab"], (1, 8))
    with torch.no_grad():
        expected = llama(input_ids).logits
        assert torch.equal(model(input_ids, routing_weights=torch.zeros(1, 2)).logits, expected)
        assert torch.equal(peft(input_ids).logits, expected)


def test_weight_placement_benchmark_quick_runs():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "weight_placement.py"), "--quick"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights copy  , every gate at zero" in result.stdout
    assert "weights shared, pmoe-4, one routed expert" in result.stdout


def test_speed_benchmark_memory_case_runs():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed.py"), "--quick", "--memory-case", "train:pmoe"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["case"] == "train:pmoe" and isinstance(report["peak_bytes"], int)


def test_continual_benchmark_quick_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "continual.py"), "--quick", "--methods", "pmoe",
         "sequential-lora", "multitask", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "continual-quick.json").read_text())
    assert set(results["summary"]) == {"pmoe", "sequential-lora", "multitask"}
    for method in results["summary"].values():
        assert {"LA", "OP", "BWT", "FWT", "trainable_per_task", "added_per_task"} <= set(method)
    assert (tmp_path / "continual-quick.png").exists()
    assert "| pmoe |" in (tmp_path / "continual-quick.md").read_text()


def test_lora_targets_benchmark_quick_runs(tmp_path):
    output = tmp_path / "lora-targets.json"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "lora_targets.py"), "--quick", "--variants",
         "full-ft-projections", "lora-embedding", "--cache-dir", str(tmp_path / "cache"), "--output", str(output)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads(output.read_text())["accuracy"]
    assert set(accuracy) == {"full-ft-projections", "lora-embedding"}
    assert 0 <= accuracy["lora-embedding"]["reverse"]["0"] <= 1
    assert "| lora-embedding |" in result.stdout


def write_cl_benchmark(root):
    """A few rows in O-LoRA's CL_Benchmark layout: two sentiment tasks sharing instruction and labels (amazon has no
    test file, yelp only a test file, as in stored snapshots), and a topic task with all three splits."""
    import random

    rng = random.Random(0)
    words = {"amazon": ["battery", "charger", "shipping", "seller"], "yelp": ["waiter", "pasta", "table", "menu"],
             "agnews": ["election", "market", "league", "minister"]}
    labels = {"amazon": ["negative", "positive"], "yelp": ["negative", "positive"],
              "agnews": ["World", "Sports", "Business", "Sci/Tech"]}
    splits = {"amazon": ["train", "dev"], "yelp": ["test"], "agnews": ["train", "dev", "test"]}
    for task, kind in (("amazon", "SC"), ("yelp", "SC"), ("agnews", "TC")):
        folder = root / kind / task
        folder.mkdir(parents=True)
        (folder / "labels.json").write_text(json.dumps(labels[task]))
        for split in splits[task]:
            rows = [{"label": rng.choice(labels[task]),
                     "sentence": " ".join(rng.choice(words[task]) for _ in range(12)) + "\n"} for _ in range(40)]
            (folder / f"{split}.json").write_text(json.dumps(rows))


def test_cl_benchmark_quick_runs_on_the_o_lora_layout(tmp_path):
    write_cl_benchmark(tmp_path / "CL_Benchmark")
    common = [sys.executable, os.path.join(ROOT, "benchmarks", "cl_benchmark.py"), "--data",
              str(tmp_path / "CL_Benchmark"), "--quick", "--tasks", "amazon", "yelp", "agnews", "--cache-dir",
              str(tmp_path / "cache"), "--output-dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(common + ["--routing-only"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    routing = json.loads((tmp_path / "cl-benchmark-routing-quick.json").read_text())
    assert routing["data"]["yelp"]["source"] == "test split in two"
    assert routing["data"]["amazon"]["source"] == "train / dev"
    assert set(routing["routing"]["custom"]) == {"gaussian", "lda", "lda + screens"}
    for per_task in routing["routing"]["custom"].values():
        assert set(per_task) == {"amazon", "yelp", "agnews"}
        assert all(0.0 <= row["accuracy"] <= 1.0 and sum(row["routed_to"].values()) == 6 for row in per_task.values())
    for row in routing["routing"]["custom"]["lda + screens"].values():  # the embedding and first-layer screens
        assert set(row["screened"]) == {"0", "1"} and 0 <= sum(row["screened"].values()) <= row["prompts"] == 6
        assert 0 <= row["decisions_changed"] <= 6

    result = subprocess.run(common + ["--methods", "pmoe", "pmoe-lda", "sequential-ft", "replay"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "cl-benchmark-quick.json").read_text())
    assert set(results["summary"]) == {"pmoe", "pmoe-lda", "sequential-ft", "replay"}
    assert set(results["routing"]) == {"pmoe", "pmoe-lda"}
    assert set(results["routing"]["pmoe"]["custom"]) == {"amazon", "yelp", "agnews"}
    assert (tmp_path / "cl-benchmark-quick.png").exists()
    assert "| pmoe-lda |" in (tmp_path / "cl-benchmark-quick.md").read_text()
    assert not (tmp_path / "cl-benchmark-quick-partial.json").exists()

    # Methods run side by side in separate processes make one table.
    result = subprocess.run(common + ["--methods", "multitask", "--name", "other"], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    merge = [sys.executable, os.path.join(ROOT, "benchmarks", "cl_benchmark.py"), "--output-dir", str(tmp_path),
             "--name", "merged", "--merge", str(tmp_path / "cl-benchmark-quick.json"), str(tmp_path / "other-quick.json")]
    result = subprocess.run(merge, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert set(merged["summary"]) == {"pmoe", "pmoe-lda", "sequential-ft", "replay", "multitask"}
    assert merged["summary"]["pmoe"] == results["summary"]["pmoe"]
    assert "| multitask |" in (tmp_path / "merged.md").read_text()
    result = subprocess.run(merge[:-1] + [str(tmp_path / "cl-benchmark-routing-quick.json")], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode != 0 and "routing-only" in result.stderr


def test_expert_update_benchmark_quick_runs():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "expert_update.py"), "--quick"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("  shipped ") == 2 and "us per module call" in result.stdout
