"""`pmoe demo`: continual learning end to end, offline, on 2 CPU cores.

1. a small Llama is pretrained on the built-in general corpus (`pmoe.tasks.pretraining_text`) on the first run and
   cached (`~/.cache/pmoe`, or `$PMOE_CACHE`);
2. it is converted to PMoE (identical logits) and trained on the built-in tasks one after another with `Trainer` +
   `PMoEContinualCallback`, one expert per task; on the same budget (steps, data, learning-rate schedule), the dense
   base is fine-tuned sequentially as the baseline. The demo uses the library's default layout, experts in every
   layer (`expert_layers="all"`): on these tasks deep-only experts learned about half as much (OP 17% against 36%);
3. after each task every task is measured by exact match, without a task id: both accuracy matrices are printed with
   LA / OP / BWT / FWT, and a PNG shows them with the router's expert choice per task;
4. the PMoE model is saved, loaded back with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` in a
   fresh process where `import pmoe` fails (so the checkpoint's own remote code runs), and answers one prompt of every
   task there.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from . import reporting
from .metrics import continual_metrics, exact_match
from .modeling_pmoe import PMoEForCausalLM
from .tasks import char_tokenizer, padding_collator, pretraining_text, task_splits
from .trainer_callbacks import PMoEContinualCallback


DEMO_TASKS = ["reverse", "add", "shift", "count"]
BASE_VERSION = "demo-base-v1"


def cache_root() -> str:
    return os.environ.get("PMOE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "pmoe"))


def encode(examples, tokenizer, with_answer=True):
    rows = []
    for example in examples:
        prompt = [tokenizer.bos_token_id] + tokenizer(example["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = prompt + answer if with_answer else prompt
        labels = [-100] * len(prompt) + answer if with_answer else None
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def pretrained_base(steps: int = 1500, cache_dir: str | None = None, seed: int = 0):
    """The demo's base model and tokenizer: loaded from the cache, or pretrained here (about a minute) and cached."""
    tokenizer = char_tokenizer()
    folder = os.path.join(cache_dir or cache_root(), f"{BASE_VERSION}-{steps}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"base model: cached at {folder}")
        return LlamaForCausalLM.from_pretrained(folder), tokenizer
    print(f"base model: pretraining a small Llama on the built-in corpus ({steps} steps, cached in {folder})")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=True,
    ))
    texts = pretraining_text(steps * 32, seed=seed)
    rows = []
    for text in texts:
        ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    args = TrainingArguments(
        output_dir=os.path.join(folder, "run"), per_device_train_batch_size=32, max_steps=steps, learning_rate=2e-3,
        lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 5),
        save_strategy="no", report_to="none", use_cpu=True, seed=seed,
    )
    Trainer(model, args, train_dataset=rows, data_collator=padding_collator(tokenizer)).train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


@torch.no_grad()
def evaluate(model, tokenizer, examples, with_routing=False):
    """Exact match of greedy answers (and, for PMoE, the expert each prompt was routed to)."""
    model.eval()
    prompts = encode(examples, tokenizer, with_answer=False)
    length = max(len(row["input_ids"]) for row in prompts)
    input_ids = torch.tensor([[0] * (length - len(r["input_ids"])) + r["input_ids"] for r in prompts])
    attention_mask = (input_ids != 0).long()
    generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, do_sample=False,
                               pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    answers = tokenizer.batch_decode(generated[:, length:], skip_special_tokens=True)
    score = exact_match(answers, [e["answer"] for e in examples], normalize=False)
    if not with_routing:
        return score, None
    routed = model(input_ids=input_ids, attention_mask=attention_mask).routing_weights.argmax(-1)
    return score, routed.tolist()


def train_task(model, rows, tokenizer, steps, learning_rate, output_dir, callbacks=(), seed=0, trainer_class=Trainer,
               trainer_kwargs=None):
    args = TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=32, max_steps=steps, learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup", warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 3),
        save_strategy="no", report_to="none", use_cpu=True, seed=seed,
    )
    trainer_class(model, args, train_dataset=rows, data_collator=padding_collator(tokenizer),
                  callbacks=list(callbacks), **(trainer_kwargs or {})).train()


RELOAD = textwrap.dedent("""
    import json, sys
    sys.modules["pmoe"] = None  # as on a machine without pmoe: the checkpoint's own remote code must do the work
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    checkpoint, data_file, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    data = load_file(data_file)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    answers, experts = [], []
    with torch.no_grad():
        identical = torch.equal(model(input_ids=data["probe"]).logits, data["logits"])
        for prompt in prompts:  # no task id: the router reads the prompt
            input_ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            out = model.generate(input_ids=input_ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 eos_token_id=tokenizer.eos_token_id)
            answers.append(tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True))
            experts.append(int(model(input_ids=input_ids).routing_weights.argmax(-1)))
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__,
                      "expert_tasks": model.config.expert_tasks, "identical_logits": identical,
                      "answers": answers, "experts": experts}))
""")


def reload_without_pmoe(checkpoint, probe, expected_logits, prompts) -> dict:
    """Load the saved checkpoint in a fresh Python process where pmoe cannot be imported, through
    `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, and answer `prompts` there."""
    from safetensors.torch import save_file

    data_file = os.path.join(checkpoint, "..", "reload-check.safetensors")
    save_file({"probe": probe.contiguous(), "logits": expected_logits.contiguous()}, data_file)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", RELOAD, checkpoint, data_file, json.dumps(prompts)],
                            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    os.remove(data_file)
    if result.returncode != 0:
        raise RuntimeError(f"Reloading {checkpoint} in a fresh process failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def format_matrix(name, tasks, matrix, metrics):
    width = max(7, *(len(task) for task in tasks))
    lines = [f"{name}: exact match on each task (columns) after training each task (rows)",
             " " * (width + 2) + "  ".join(f"{task:>{width}}" for task in tasks)]
    for task, row in zip(tasks, matrix):
        lines.append(f"{task:>{width}}  " + "  ".join(f"{value:>{width}.0%}" for value in row))
    lines.append(f"  LA {metrics['LA']:.1%}   OP {metrics['OP']:.1%}   BWT {metrics['BWT']:+.1%}   "
                 f"FWT {metrics['FWT']:+.1%}")
    return "\n".join(lines)


def save_figure(path, tasks, results, routing):
    """The demo's figure: both methods' accuracy matrices and the PMoE router's routing matrix."""
    panels = [(name, result["matrix"], result["metrics"]) for name, result in results.items()]
    usage = [[routes.count(expert) / len(routes) for expert in range(len(tasks))] for routes in routing]
    reporting.save_figure(reporting.accuracy_matrix_figure(tasks, panels, routing=usage), path)


def run_demo(output_dir: str | None = None, steps_per_task: int = 300, pretrain_steps: int = 1500,
             train_examples: int = 4000, test_examples: int = 100, cache_dir: str | None = None,
             expert_layers: str = "all", expert_lr: float = 3e-3, expert_rank: int = 8,
             seed: int = 0) -> dict:
    started = time.time()
    hf_logging.set_verbosity_error()
    output_dir = output_dir or os.path.join(os.getcwd(), "pmoe-demo")
    os.makedirs(output_dir, exist_ok=True)
    base, tokenizer = pretrained_base(pretrain_steps, cache_dir, seed)
    splits = {task: task_splits(task, train_examples, test_examples, seed) for task in DEMO_TASKS}
    train_rows = {task: encode(splits[task]["train"], tokenizer) for task in DEMO_TASKS}

    model = PMoEForCausalLM.from_dense(
        base, num_shallow_layers=2, expert_rank=expert_rank, expert_layers=expert_layers
    )
    probe = torch.tensor([encode(splits["add"]["test"][:4], tokenizer)[0]["input_ids"]])
    with torch.no_grad():
        conversion_diff = (model(input_ids=probe).logits - base(input_ids=probe).logits).abs().max().item()
    layout = "experts in every layer" if expert_layers == "all" else "experts in the 2 deep layers only"
    print(f"converted to PMoE (2 shallow + 2 deep layers, {layout}): max |logit diff| vs the dense base = "
          f"{conversion_diff:.1e}")
    baseline = [evaluate(base, tokenizer, splits[task]["test"])[0] for task in DEMO_TASKS]

    results = {}
    callback = PMoEContinualCallback(tasks=DEMO_TASKS)
    matrix = []
    for index, task in enumerate(DEMO_TASKS):
        print(f"\n[PMoE] task '{task}': new expert, {steps_per_task} steps")
        train_task(model, train_rows[task], tokenizer, steps_per_task, expert_lr, os.path.join(output_dir, "runs", task),
                   [callback], seed)
        last = index == len(DEMO_TASKS) - 1  # the final model's routing comes with its last row
        row = [evaluate(model, tokenizer, splits[t]["test"], with_routing=last) for t in DEMO_TASKS]
        matrix.append([score for score, _ in row])
    routing = [routes for _, routes in row]
    results["PMoE (one expert per task)"] = {"matrix": matrix, "metrics": continual_metrics(matrix, baseline)}

    sequential = LlamaForCausalLM.from_pretrained(os.path.join(cache_dir or cache_root(),
                                                               f"{BASE_VERSION}-{pretrain_steps}"))
    matrix = []
    for task in DEMO_TASKS:
        print(f"\n[sequential fine-tuning] task '{task}': {steps_per_task} steps")
        train_task(sequential, train_rows[task], tokenizer, steps_per_task, 1e-3,
                   os.path.join(output_dir, "runs", f"sequential-{task}"), seed=seed)
        matrix.append([evaluate(sequential, tokenizer, splits[t]["test"])[0] for t in DEMO_TASKS])
    results["sequential fine-tuning"] = {"matrix": matrix, "metrics": continual_metrics(matrix, baseline)}

    print()
    for name, result in results.items():
        print(format_matrix(name, DEMO_TASKS, result["matrix"], result["metrics"]) + "\n")
    figure = os.path.join(output_dir, "continual_learning.png")
    save_figure(figure, DEMO_TASKS, results, routing)

    checkpoint = os.path.join(output_dir, "pmoe-model")
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    examples = [splits[task]["test"][0] for task in DEMO_TASKS]
    with torch.no_grad():
        expected_logits = model.eval()(input_ids=probe).logits
    reloaded = reload_without_pmoe(checkpoint, probe, expected_logits, [e["prompt"] for e in examples])
    identical = reloaded["identical_logits"]
    print(f"saved {checkpoint}; reloaded in a fresh process without pmoe as {reloaded['class']} "
          f"(AutoModelForCausalLM, trust_remote_code=True): experts {reloaded['expert_tasks']}, identical logits: "
          f"{identical}")
    for example, answer, expert in zip(examples, reloaded["answers"], reloaded["experts"]):
        print(f"  {example['prompt']!r:>18} -> {answer!r:<10} (expected {example['answer']!r}, expert {expert})")
    summary = {"tasks": DEMO_TASKS, "baseline": baseline, "methods": results, "router_choice": routing,
               "conversion_diff": conversion_diff, "identical_after_reload": identical, "figure": figure,
               "seconds": time.time() - started}
    with open(os.path.join(output_dir, "demo_results.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print(f"figure: {figure}; results: {os.path.join(output_dir, 'demo_results.json')}; "
          f"done in {time.time() - started:.0f}s")
    return summary
