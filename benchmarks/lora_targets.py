#!/usr/bin/env python
"""Which weights must a task's update reach? Single-task fine-tuning of the built-in tasks with PEFT LoRA on
different targets, against full fine-tuning, from the demo's pretrained base.

Each variant trains one task from the base (300 steps of 32 examples, the continual benchmark's budget and learning
rates: 1e-3 for full fine-tuning, 3e-3 for LoRA rank 8, alpha 16) and reports exact match on the task's test split,
per seed. It is how the embedding experts were found: on `reverse`, a rank-8 LoRA on the seven projections learns the
task on some seeds only, full fine-tuning of the projections alone learns it, and adding a LoRA on the token
embedding makes the rank-8 update learn it on every seed.

Variants:
  full-ft                       every weight (lr 1e-3)
  full-ft-projections           only the seven projections (embeddings, LM head and norms frozen; lr 1e-3)
  lora                          PEFT LoRA on the seven projections of every layer (lr 3e-3)
  lora-head                     ... and on the LM head
  lora-embedding                ... and on the token embedding (what pmoe's experts target by default)
  lora-embedding-head           ... and on both

    python benchmarks/lora_targets.py --threads 1    # reverse, seeds 0-4: about 15 minutes
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
from pmoe.configuration_pmoe import EMBEDDING_TARGET, EXPERT_TARGET_MODULES  # noqa: E402
from pmoe.demo import DEMO_TASKS, encode, evaluate, pretrained_base, train_task  # noqa: E402
from pmoe.tasks import task_splits  # noqa: E402


PROJECTIONS = list(EXPERT_TARGET_MODULES)
LORA_TARGETS = {
    "lora": PROJECTIONS,
    "lora-head": PROJECTIONS + ["lm_head"],
    "lora-embedding": PROJECTIONS + [EMBEDDING_TARGET],
    "lora-embedding-head": PROJECTIONS + [EMBEDDING_TARGET, "lm_head"],
}
VARIANTS = ["full-ft", "full-ft-projections", *LORA_TARGETS]


def build(variant, base, rank):
    """The model to train and its learning rate."""
    model = copy.deepcopy(base)
    if variant == "full-ft":
        return model, 1e-3
    if variant == "full-ft-projections":
        for name, param in model.named_parameters():
            param.requires_grad_(any(target in name for target in PROJECTIONS))
        return model, 1e-3
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS[variant])
    return get_peft_model(model, config), 3e-3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--tasks", nargs="+", choices=DEMO_TASKS, default=["reverse"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--test-examples", type=int, default=100)
    parser.add_argument("--cache-dir", default=None, help="where the pretrained base is cached")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few steps and examples, to keep the script working")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "plasticity",
                                                         "lora-targets.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain_steps = 1500
    if args.quick:
        args.steps, args.train_examples, args.test_examples, args.seeds, pretrain_steps = 2, 64, 8, args.seeds[:1], 3
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base, tokenizer = pretrained_base(pretrain_steps, args.cache_dir)
    workdir = os.path.join(os.path.dirname(args.output) or ".", "tmp-runs")
    results = {variant: {} for variant in args.variants}
    for variant in args.variants:
        for seed in args.seeds:
            for task in args.tasks:
                splits = task_splits(task, args.train_examples, args.test_examples, seed)
                torch.manual_seed(seed)
                model, learning_rate = build(variant, base, args.rank)
                started = time.time()
                train_task(model, encode(splits["train"], tokenizer), tokenizer, args.steps, learning_rate, workdir,
                           seed=seed)
                accuracy = evaluate(model, tokenizer, splits["test"])[0]
                results[variant].setdefault(task, {})[str(seed)] = accuracy
                print(f"{variant} {task} seed {seed}: {100 * accuracy:.0f}% ({time.time() - started:.0f}s)", flush=True)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump({"args": vars(args), "accuracy": results}, handle, indent=2)
    print("\n| variant | " + " | ".join(args.tasks) + " |")
    print("|---|" + "---|" * len(args.tasks))
    for variant, by_task in results.items():
        cells = [" / ".join(f"{100 * by_task[task][str(seed)]:.0f}" for seed in args.seeds) for task in args.tasks]
        print(f"| {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
