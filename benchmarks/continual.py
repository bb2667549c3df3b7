#!/usr/bin/env python
"""Continual-learning quality of PMoE against the usual baselines, on the built-in task sequence.

Every method starts from the same pretrained base (the demo's, `pmoe.demo.pretrained_base`), sees the same data in
the same task order, trains the same number of steps per task, and is measured the same way (exact match of greedy
answers on each task's test split, no task id) after every task. Reported per method, mean and spread over seeds:
LA (learning accuracy, the diagonal), OP (overall performance, the last row), BWT, FWT, trainable parameters per
task, parameters added per task, wall time.

Methods (`--suite main`, the default):
  pmoe                  library defaults (experts in every layer and on the embedding, sequence routing, LDA keys)
  pmoe-deep-only        experts in the deep layers only: the PMoE paper's asymmetric layout (`expert_layers="deep"`)
  pmoe-router-layer0    the router reads the token embeddings (no expert-free pass before the first layer)
  pmoe-router-layer1    the router reads the first layer's output instead of the boundary
  pmoe-distill          + Lifelong-MoE distillation (alpha 0.5)
  pmoe-merge            + expert merging every 100 steps (svd)
  pmoe-lda, pmoe-gaussian
                        the default with each fitted key kind named explicitly (LDA is the default)
  sequential-ft         full fine-tuning, task after task
  sequential-lora       one PEFT LoRA adapter (same rank, all 7 projections of every layer), task after task
  o-lora                O-LoRA (Wang et al. 2023): a new PEFT LoRA per task, orthogonal to the earlier tasks' LoRA
                        subspaces (loss + 0.5 * sum ||A_old A_new^T||^2); earlier adapters frozen and summed (merged
                        into the base, which is the same function)
  replay                full fine-tuning with a buffer of 200 examples of each earlier task mixed in
  multitask             full fine-tuning on all tasks at once, same total steps (upper bound; OP only)
  single-task-lora      a fresh PEFT LoRA adapter per task from the base (the reference for LA)

Plasticity sweeps (`--suite sweeps`; "deep-*" keep the asymmetric layout and change one knob):
  deep-shallow-{0,1,3}  number of shallow layers (2 of 4 otherwise; 0 = experts everywhere, router on embeddings)
  deep-rank-{4,32}      expert rank (8 otherwise)
  deep-token            token-level routing with Gaussian keys (one gate per sequence otherwise)
  deep-token-learned    token-level routing with learned keys (the PMoE paper's router)
  pmoe-rank-32          the default layout at rank 32

Plasticity experiments (not in a suite; pass them with --methods):
  pmoe-alpha-{64,256}   LoRA alpha 64 / 256 instead of 2 * rank = 16. Under Adam, scaling alpha by k is LoRA+ with a
                        learning-rate ratio k for B (same trajectory, B k times larger), so these are LoRA+ 4 and 16
  pmoe-rank-128         rank 128 = the base's hidden size: as expressive as full fine-tuning of those projections
  pmoe-init-previous    a new task's expert starts as a copy of the previous task's (`new_expert_init="previous"`)
  pmoe-init-nearest     ... of the earlier expert that fits the new task's first batch best, if one beats the base
                        (`new_expert_init="nearest"`)
  pmoe-keys-in-steps    the router keys fitted inside each task's first steps, not in one pass before them
                        (`fit_keys_before_training=False`): the same accuracy is expected, at a slower step

    python benchmarks/continual.py                          # the main table, 3 seeds
    python benchmarks/continual.py --suite sweeps           # the plasticity sweeps, 3 seeds
    python benchmarks/continual.py --methods pmoe sequential-ft --seeds 0
    python benchmarks/continual.py --quick                  # seconds: keeps the script working (tests)
"""

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time

import torch
from transformers import Trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from pmoe import PMoEContinualCallback, PMoEForCausalLM  # noqa: E402
from pmoe.configuration_pmoe import default_expert_target_modules  # noqa: E402
from pmoe.demo import DEMO_TASKS, encode, evaluate, pretrained_base, train_task  # noqa: E402
from pmoe import reporting  # noqa: E402
from pmoe.metrics import continual_metrics  # noqa: E402
from pmoe.tasks import task_splits  # noqa: E402


TARGETS = default_expert_target_modules("all")  # the experts' default targets: 7 projections and the embedding
PMOE_OPTIONS = {
    "pmoe": {},
    "pmoe-deep-only": {"expert_layers": "deep"},
    "pmoe-router-layer0": {"router_input_layer": 0},
    "pmoe-router-layer1": {"router_input_layer": 1},
    "pmoe-distill": {"distillation_alpha": 0.5},
    "pmoe-merge": {},
    "deep-shallow-0": {"expert_layers": "deep", "num_shallow_layers": 0},
    "deep-shallow-1": {"expert_layers": "deep", "num_shallow_layers": 1},
    "deep-shallow-3": {"expert_layers": "deep", "num_shallow_layers": 3},
    "deep-rank-4": {"expert_layers": "deep", "expert_rank": 4},
    "deep-rank-32": {"expert_layers": "deep", "expert_rank": 32},
    "deep-token": {"expert_layers": "deep", "routing": "token"},
    "deep-token-learned": {"expert_layers": "deep", "routing": "token", "router_keys": "learned"},
    "pmoe-rank-32": {"expert_rank": 32},
    "pmoe-lda": {"router_keys": "lda"},
    "pmoe-gaussian": {"router_keys": "gaussian"},
    "pmoe-alpha-64": {"expert_alpha": 64},
    "pmoe-alpha-256": {"expert_alpha": 256},
    "pmoe-init-previous": {},
    "pmoe-init-nearest": {},
    "pmoe-rank-128": {"expert_rank": 128},
    "pmoe-keys-in-steps": {},
}
CALLBACK_OPTIONS = {  # PMoEContinualCallback arguments of the methods that need them
    "pmoe-merge": {"merge_every_n_steps": 100},
    "pmoe-init-previous": {"new_expert_init": "previous"},
    "pmoe-init-nearest": {"new_expert_init": "nearest"},
    "pmoe-keys-in-steps": {"fit_keys_before_training": False},  # the key fitted inside the first steps (comparison)
}
BASELINES = ["sequential-ft", "sequential-lora", "o-lora", "replay", "multitask", "single-task-lora"]
SUITES = {
    "main": ["pmoe", "pmoe-deep-only", "pmoe-router-layer1", "pmoe-distill", "pmoe-merge", *BASELINES],
    "sweeps": ["deep-shallow-0", "deep-shallow-1", "deep-shallow-3", "deep-rank-4",
               "deep-rank-32", "deep-token", "deep-token-learned", "pmoe-rank-32"],  # read beside the main table
}
METHODS = list(PMOE_OPTIONS) + BASELINES
O_LORA_ORTHOGONALITY = 0.5  # lambda_1 of the O-LoRA paper


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora(model, rank):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS))


def lora_a_of(module):
    """A PEFT LoRA layer's A matrix `[r, in]` (`lora_embedding_A` on an embedding), or None."""
    if "default" in module.lora_A:
        return module.lora_A["default"].weight
    return module.lora_embedding_A["default"] if "default" in getattr(module, "lora_embedding_A", {}) else None


class OrthogonalLoRATrainer(Trainer):
    """O-LoRA's loss: the task loss plus lambda * sum over modules and earlier tasks of ||A_old A_new^T||_F^2."""

    def __init__(self, *args, old_lora_a=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.old_lora_a = old_lora_a or {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        penalty = 0.0
        for name, module in model.named_modules():
            if name in self.old_lora_a:
                new_a = lora_a_of(module)
                penalty = penalty + sum((old.to(new_a) @ new_a.T).pow(2).sum() for old in self.old_lora_a[name])
        loss = loss + O_LORA_ORTHOGONALITY * penalty
        return (loss, outputs) if return_outputs else loss


def o_lora(base, tokenizer, data, tasks, args, seed, workdir, row_of):
    model, old_lora_a, matrix, info = copy.deepcopy(base), {}, [], {"added_per_task": 0}
    for task in tasks:
        peft_model = lora(model, args.rank)
        info["trainable_per_task"] = trainable(peft_model)
        train_task(peft_model, data[task]["rows"], tokenizer, args.steps_per_task, args.expert_lr, workdir, seed=seed,
                   trainer_class=OrthogonalLoRATrainer, trainer_kwargs={"old_lora_a": old_lora_a})
        for name, module in peft_model.named_modules():
            lora_a = lora_a_of(module) if hasattr(module, "lora_A") else None
            if lora_a is not None:
                old_lora_a.setdefault(name, []).append(lora_a.detach().clone())
        model = peft_model.merge_and_unload()  # frozen, summed: the earlier adapters become part of the base
        matrix.append(row_of(model))
    return matrix, info


def run_method(method, base, tokenizer, data, args, seed, workdir, tasks=DEMO_TASKS, evaluate_fn=evaluate,
               on_pmoe_done=None):
    """Returns the accuracy matrix (rows: after each task) and the parameter counts. `evaluate_fn(model, tokenizer,
    examples)` returns `(score, _)`; `on_pmoe_done(model)` sees each PMoE model after its last task (extra info)."""
    steps, rank = args.steps_per_task, args.rank
    row_of = lambda model: [evaluate_fn(model, tokenizer, data[t]["test"])[0] for t in tasks]  # noqa: E731
    matrix, info = [], {}
    torch.manual_seed(seed)
    if method in PMOE_OPTIONS:
        options = {"expert_rank": rank, **PMOE_OPTIONS[method]}
        model = PMoEForCausalLM.from_dense(copy.deepcopy(base), **options)
        callback = PMoEContinualCallback(tasks=tasks, **CALLBACK_OPTIONS.get(method, {}))
        for task in tasks:
            train_task(model, data[task]["rows"], tokenizer, steps, args.expert_lr, workdir, [callback], seed)
            info.setdefault("trainable_per_task", trainable(model))
            matrix.append(row_of(model))
        info["added_per_task"] = sum(p.numel() for p in model.expert_parameters(0).values())
        if callback.started_from:  # new_expert_init="nearest": which earlier expert each task's expert copied
            info["started_from"] = dict(callback.started_from)
        if on_pmoe_done is not None:
            info.update(on_pmoe_done(model))
    elif method in ("sequential-ft", "replay"):
        model = copy.deepcopy(base)
        rng = random.Random(seed)
        buffer = []
        for task in tasks:
            rows = list(data[task]["rows"]) + (buffer if method == "replay" else [])
            train_task(model, rows, tokenizer, steps, args.full_lr, workdir, seed=seed)
            buffer += rng.sample(data[task]["rows"], min(200, len(data[task]["rows"])))
            matrix.append(row_of(model))
        info.update(trainable_per_task=trainable(model), added_per_task=0)
    elif method == "sequential-lora":
        model = lora(copy.deepcopy(base), rank)
        for task in tasks:
            train_task(model, data[task]["rows"], tokenizer, steps, args.expert_lr, workdir, seed=seed)
            matrix.append(row_of(model))
        info.update(trainable_per_task=trainable(model), added_per_task=trainable(model) // len(tasks))
    elif method == "o-lora":
        matrix, info = o_lora(base, tokenizer, data, tasks, args, seed, workdir, row_of)
    elif method == "multitask":
        model = copy.deepcopy(base)
        rows = [row for task in tasks for row in data[task]["rows"]]
        train_task(model, rows, tokenizer, steps * len(tasks), args.full_lr, workdir, seed=seed)
        final = row_of(model)
        matrix = [final for _ in tasks]  # one model: only OP is meaningful
        info.update(trainable_per_task=trainable(model), added_per_task=0)
    elif method == "single-task-lora":
        diagonal = []
        for index, task in enumerate(tasks):
            model = lora(copy.deepcopy(base), rank)
            train_task(model, data[task]["rows"], tokenizer, steps, args.expert_lr, workdir, seed=seed)
            diagonal.append(evaluate_fn(model, tokenizer, data[task]["test"])[0])
        matrix = [[diagonal[j] if j == i else 0.0 for j in range(len(tasks))] for i in range(len(tasks))]
        info.update(trainable_per_task=trainable(model), added_per_task=trainable(model))
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return matrix, info


def summarize(runs):
    """Mean and standard deviation over seeds of each metric."""
    out = {}
    for key in ("LA", "OP", "BWT", "FWT"):
        values = [run["metrics"][key] for run in runs]
        out[key] = {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}
    out["seconds"] = statistics.mean(run["seconds"] for run in runs)
    out["trainable_per_task"] = runs[0]["trainable_per_task"]
    out["added_per_task"] = runs[0]["added_per_task"]
    out["seeds"] = [run["seed"] for run in runs]
    return out


def markdown(summary, args) -> str:
    caption = (
        f"Built-in tasks {', '.join(DEMO_TASKS)} (in this order); {args.steps_per_task} steps of 32 examples per task; "
        f"exact match (%) on each task's test split, no task id; mean ± std over seeds "
        f"{summary[next(iter(summary))]['seeds']}; LoRA / expert rank {args.rank}; {args.threads} CPU thread(s) per run."
    )
    return results_table(summary, caption)


def results_table(summary, caption) -> str:
    """The caption, then one row per method: LA / OP / BWT / FWT (mean ± std), parameters, time."""
    def cell(metric, method):
        value = summary[method][metric]
        if not reporting.metric_applies(method, metric):
            return "-"
        return f"{100 * value['mean']:.1f} ± {100 * value['std']:.1f}"

    lines = [
        caption,
        "",
        "| method | LA | OP | BWT | FWT | trainable params / task | params added / task | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        lines.append(
            f"| {method} | {cell('LA', method)} | {cell('OP', method)} | {cell('BWT', method)} | "
            f"{cell('FWT', method)} | {row['trainable_per_task']:,} | {row['added_per_task']:,} | "
            f"{row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def save_figure(path, summary):
    reporting.save_figure(reporting.method_summary_figure(summary, ylabel="exact match (%)"), path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="main", help="which table (default: main)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="instead of a suite's methods")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps-per-task", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--expert-lr", type=float, default=3e-3, help="PMoE experts and LoRA adapters")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="full fine-tuning (sequential, replay, multitask)")
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 lets two runs share a 2-core machine fairly")
    parser.add_argument("--quick", action="store_true", help="a few steps and examples, to keep the script working")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--name", default=None,
                        help="results file stem (default: continual, or continual-<suite> for another suite)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.methods is None:
        args.methods = SUITES[args.suite]
    name = args.name or ("continual" if args.suite == "main" else f"continual-{args.suite}")
    if args.quick:
        args.steps_per_task, args.train_examples, args.test_examples, args.pretrain_steps = 2, 64, 8, 3
        args.seeds = args.seeds[:1]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base, tokenizer = pretrained_base(args.pretrain_steps, args.cache_dir)
    workdir = os.path.join(args.output_dir, "tmp-runs")
    runs = {method: [] for method in args.methods}
    for seed in args.seeds:
        data = {}
        for task in DEMO_TASKS:
            splits = task_splits(task, args.train_examples, args.test_examples, seed)
            data[task] = {"rows": encode(splits["train"], tokenizer), "test": splits["test"]}
        baseline = [evaluate(base, tokenizer, data[t]["test"])[0] for t in DEMO_TASKS]
        for method in args.methods:
            started = time.time()
            matrix, info = run_method(method, base, tokenizer, data, args, seed, workdir)
            run = {"seed": seed, "matrix": matrix, "baseline": baseline, "seconds": time.time() - started,
                   "metrics": continual_metrics(matrix, baseline), **info}
            runs[method].append(run)
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, f"{name}-partial.json"), "w") as handle:
                json.dump({"args": vars(args), "runs": runs}, handle)  # survives an interrupted run
            print(f"seed {seed} {method}: LA {run['metrics']['LA']:.3f} OP {run['metrics']['OP']:.3f} "
                  f"BWT {run['metrics']['BWT']:+.3f} ({run['seconds']:.0f}s)", flush=True)
    summary = {method: summarize(method_runs) for method, method_runs in runs.items()}
    os.makedirs(args.output_dir, exist_ok=True)
    stem = os.path.join(args.output_dir, f"{name}-quick" if args.quick else name)
    with open(stem + ".json", "w") as handle:
        json.dump({"args": vars(args), "tasks": DEMO_TASKS, "summary": summary, "runs": runs}, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(markdown(summary, args))
    save_figure(stem + ".png", summary)
    os.remove(os.path.join(args.output_dir, f"{name}-partial.json"))
    print(markdown(summary, args))


if __name__ == "__main__":
    main()
