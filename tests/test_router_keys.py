"""LDA router keys (`router_keys="lda"`): one Gaussian per task with a covariance shared by all tasks, kept as per-task
count / sum / sum of outer products. Its scores equal an LDA fitted on every task's features at once, it separates
tasks that differ along correlated directions, growth stays bit-exact, and its statistics survive bf16, save / load
and remote code."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import pmoe
from pmoe.experts_pmoe import PMoERouter

from helpers import make_pmoe, padded_batch, randomize_experts


HIDDEN = 32


def router_config(keys="lda", **overrides):
    fields = dict(vocab_size=10, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, router_keys=keys, num_experts=3, expert_tasks=["a", "b", "c"])
    fields.update(overrides)
    return pmoe.PMoEConfig(**fields)


def correlated_tasks(samples, task, generator):
    """Tasks that differ along `u` while every sample also moves a lot along `v` (all coordinates at once): per
    coordinate the tasks overlap, jointly they do not."""
    v = torch.ones(HIDDEN) / HIDDEN**0.5
    u = torch.cat([torch.ones(HIDDEN // 2), -torch.ones(HIDDEN // 2)]) / HIDDEN**0.5
    shared = torch.randn(samples, 1, generator=generator) * 4.0
    noise = torch.randn(samples, HIDDEN, generator=generator) * 0.3
    return shared * v + noise + (0.9 if task else -0.9) * u


def test_lda_scores_equal_a_discriminant_fitted_on_all_tasks_at_once():
    config = router_config(router_shrinkage=0.2)
    router = PMoERouter(config)
    generator = torch.Generator().manual_seed(0)
    features = [torch.randn(n, HIDDEN, generator=generator) * (1 + task) + task for task, n in enumerate((7, 20, 13))]
    for task, task_features in enumerate(features):  # fitted as training would: in batches, as they come
        for chunk in task_features.split(3):
            router.experts[task].accumulate(chunk)

    # Joint fit from the raw features, in float64.
    everything = torch.cat(features).double()
    means = [f.double().mean(0) for f in features]
    within = sum((f.double() - m).T @ (f.double() - m) for f, m in zip(features, means))
    covariance = within / (everything.shape[0] - len(features))
    shrunk = 0.8 * covariance + (0.2 * covariance.diagonal().mean() + config.router_variance_floor) * torch.eye(HIDDEN)
    precision = torch.linalg.inv(shrunk)
    queries = torch.randn(5, 1, HIDDEN, generator=generator)
    expected = torch.stack(
        [queries.double() @ precision @ m - 0.5 * m @ precision @ m for m in means], dim=-1
    ).float()
    torch.testing.assert_close(router.logits(queries), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(router.logits(queries).argmax(-1), expected.argmax(-1))


def test_lda_separates_tasks_the_diagonal_gaussian_confuses():
    accuracy = {}
    for keys in ("gaussian", "lda"):
        router = PMoERouter(router_config(keys, num_experts=2, expert_tasks=["a", "b"]))
        generator = torch.Generator().manual_seed(0)
        for task in range(2):
            router.experts[task].accumulate(correlated_tasks(200, task, generator))
        correct = 0
        for task in range(2):
            gates = router(correlated_tasks(500, task, generator)[:, None, :])[1][:, 0]
            correct += (gates.argmax(-1) == task).sum().item()
        accuracy[keys] = correct / 1000
    assert accuracy["lda"] >= 0.99 and accuracy["gaussian"] < 0.9, accuracy


def test_unfitted_lda_keys_score_minus_infinity_and_shrinkage_keeps_few_samples_invertible():
    router = PMoERouter(router_config())
    router.experts[1].accumulate(torch.randn(2, HIDDEN))  # 2 samples, 32 dimensions
    logits = router.logits(torch.randn(4, 1, HIDDEN))
    assert torch.isinf(logits[..., 0]).all() and torch.isinf(logits[..., 2]).all()
    assert torch.isfinite(logits[..., 1]).all()


def lda_model(**overrides):
    model = make_pmoe(router_keys="lda", **overrides)
    for task in ("a", "b"):
        model.add_expert(task)
    randomize_experts(model)  # LoRA weights, and 10 samples fitted into each LDA key
    return model.eval()


@pytest.mark.parametrize("projection", [16, 256], ids=["projected", "full"])
def test_growth_with_lda_keys_is_bit_exact(projection):
    model = lda_model(router_projection_size=projection)
    assert model.config.router_feature_size == min(projection, model.config.hidden_size)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=input_ids, attention_mask=attention_mask)
        model.add_expert("c")
        after = model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.routing_weights, after.routing_weights[:, :2])
    assert (after.routing_weights[:, 2] == 0).all()


def test_training_fits_the_trained_experts_lda_key_and_routes_by_it():
    model = make_pmoe(router_keys="lda")
    generator = torch.Generator().manual_seed(3)
    prompts = {"low": lambda n: torch.randint(3, 9, (n, 8), generator=generator),
               "high": lambda n: torch.randint(90, 97, (n, 8), generator=generator)}
    prompt = torch.arange(8) < 4
    for task, make in prompts.items():
        model.add_expert(task)
        model.train()
        for _ in range(8):
            ids = make(8)
            model(input_ids=ids, labels=ids.masked_fill(prompt, -100)).loss.backward()
    counts = [router.experts[i].count.item() for router in model.expert_routers() for i in range(2)]
    assert counts == [64, 64]
    model.eval()
    with torch.no_grad():
        for index, make in enumerate(prompts.values()):  # routed on the prompt, as in training
            gates = model(input_ids=make(10), routing_mask=prompt.expand(10, 8)).routing_weights
            assert (gates.argmax(-1) == index).all()


def test_lda_statistics_stay_float64_in_bf16_models():
    model = lda_model(router_projection_size=16).to(torch.bfloat16)
    router = model.model.routers[0]
    assert router.projection.dtype == torch.float32 and router.usage.dtype == torch.float32
    assert {getattr(entry, name).dtype for entry in router.experts for name in entry.statistics} == {torch.float64}
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        gates = model(input_ids=input_ids, attention_mask=attention_mask).routing_weights
    assert torch.isfinite(gates).all() and torch.allclose(gates.sum(-1), torch.ones(3), atol=2e-2)  # bf16 gates


def test_merging_lda_keys_adds_their_statistics():
    model = lda_model()
    model.add_expert("c")
    router = model.model.routers[0]
    a, b = router.experts[0], router.experts[1]
    expected = {name: getattr(a, name) + getattr(b, name) for name in a.statistics}
    model.merge_experts(method="average", sources=(0, 1), target=2)
    for name, value in expected.items():
        assert torch.equal(getattr(router.experts[2], name), value)


CHILD = textwrap.dedent("""
    import json, sys
    sys.modules["pmoe"] = None
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    data = load_file(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    print(json.dumps({"identical": bool(torch.equal(logits, data["logits"])), "keys": model.config.router_keys,
                      "module": type(model).__module__}))
""")


def test_lda_keys_save_load_and_run_as_remote_code(tmp_path):
    model = lda_model(router_projection_size=16)
    model.save_pretrained(tmp_path / "checkpoint")
    saved = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert saved["model.routers.0.experts.1.feature_outer_sum"].dtype == torch.float64
    assert saved["model.routers.0.projection"].shape == (16, model.config.hidden_size)
    loaded = pmoe.PMoEForCausalLM.from_pretrained(tmp_path / "checkpoint").eval()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert torch.equal(loaded(input_ids=input_ids, attention_mask=attention_mask).logits, logits)
    save_file({"input_ids": input_ids, "attention_mask": attention_mask, "logits": logits}, tmp_path / "data.st")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "checkpoint"), str(tmp_path / "data.st")], capture_output=True,
        text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                     # the same thread count: LAPACK's inverse may round otherwise with another
                                     "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"identical": True, "keys": "lda", "module": report["module"]}
    assert report["module"].startswith("transformers_modules")


def test_pmoe_info_shows_lda_keys(tmp_path):
    lda_model(router_projection_size=16).save_pretrained(tmp_path / "checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "pmoe", "info", str(tmp_path / "checkpoint"), "--json"], capture_output=True, text=True,
        timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["router_keys"] == "lda" and summary["router_feature_size"] == 16
    assert [expert["key_samples"] for expert in summary["experts"]] == [[10.0], [10.0]]
