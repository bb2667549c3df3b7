#!/usr/bin/env python
"""Continual learning on real text: O-LoRA's Standard CL Benchmark and Long Sequence, from a local copy of its data.

The data is public in O-LoRA's repository (github.com/cmnfriend/O-LoRA, folder `CL_Benchmark/`: one folder per task,
`train.json` / `dev.json` / `test.json` of `{"label", "sentence"}` and `labels.json`); pass the folder with `--data`.
Nothing is downloaded. Prompts follow O-LoRA's loaders: the task TYPE's instruction (every sentiment task asks "What is
the sentiment of the following paragraph?"), `Option: <labels>`, the text, `Answer:`; the answer is the label. O-LoRA's
own scripts also prefix `Task:<type>` and `Dataset:<name>`, which names the task: that is off here (`--name-the-task`
turns it on), so a router has to tell tasks apart by their content, as users' tasks need.

Task orders (O-LoRA's scripts): Standard `1` dbpedia, amazon, yahoo, agnews; `2` dbpedia, amazon, agnews, yahoo;
`3` yahoo, amazon, agnews, dbpedia; `long` the 15 tasks of the Long Sequence. `--tasks` gives any order,
`--substitute yahoo=yelp` replaces a task whose files are missing (stored snapshots of the repository lack yahoo's).
Missing splits are made from what is there, and the results record it: no test file -> the dev file; neither -> the
last examples of the training file; no training file -> the first part of the dev or test file.

Base model: a small Llama this script pretrains on the benchmark's own training text (labels unused) with a byte-level
BPE tokenizer it trains, both cached (`--cache-dir`); or any Llama-family checkpoint (`--model-name-or-path`).

Modes:
  --routing-only   fit each router key kind on every task's training prompts (no expert training: with the default
                   layout the gate comes from an expert-free pass, the dense base's forward, so routing does not
                   depend on the experts) and report routing accuracy per task; `--router-input-layers 0 1 2`
                   compares where the router reads (one base forward serves every kind and layer); minutes
  (default)        the methods of benchmarks/continual.py (pmoe variants, sequential fine-tuning / LoRA, O-LoRA,
                   replay, multitask) on the same base, data, steps and seeds: LA / OP / BWT / FWT, and for pmoe the
                   routing accuracy per task after the last task

    python benchmarks/cl_benchmark.py --data path/to/O-LoRA/CL_Benchmark --routing-only --orders 1 2 3
    python benchmarks/cl_benchmark.py --data path/to/O-LoRA/CL_Benchmark --orders 1 --methods pmoe sequential-ft
"""

import argparse
import copy
import hashlib
import json
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))
from continual import METHODS, PMOE_OPTIONS, results_table, run_method, save_figure, summarize  # noqa: E402
from pmoe import PMoEForCausalLM  # noqa: E402
from pmoe.experts_pmoe import screen_is_sure  # noqa: E402
from pmoe.metrics import continual_metrics, exact_match  # noqa: E402


ORDERS = {
    "1": ["dbpedia", "amazon", "yahoo", "agnews"],
    "2": ["dbpedia", "amazon", "agnews", "yahoo"],
    "3": ["yahoo", "amazon", "agnews", "dbpedia"],
    "long": ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB", "SST-2", "dbpedia", "agnews", "yahoo",
             "MultiRC", "BoolQA", "WiC"],
}
TASK_TYPES = {
    "dbpedia": "TC", "agnews": "TC", "yahoo": "TC", "amazon": "SC", "yelp": "SC", "IMDB": "SC", "SST-2": "SC",
    "MNLI": "NLI", "CB": "NLI", "RTE": "NLI", "QQP": "QQP", "BoolQA": "BoolQA", "COPA": "COPA", "MultiRC": "MultiRC",
    "WiC": "WiC",
}
# O-LoRA's configs/instruction_config.json (zero-shot, "single" strategy); COPA's prompt is its sentence alone.
INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the '
           "option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.\n',
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? Choose one "
               "from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? Choose one "
           "from the option.\n",
}
ROUTER_KEY_KINDS = ["gaussian", "lda"]
PAD, BOS, EOS = 0, 1, 2


# ------------------------------------------------------------------------------------------------------ data
def task_folder(data_dir, task):
    folder = os.path.join(data_dir, TASK_TYPES[task], task)
    if not os.path.isdir(folder):
        raise SystemExit(f"task {task!r}: no folder {folder} (expected O-LoRA's CL_Benchmark layout)")
    return folder


def read_split(folder, split):
    path = os.path.join(folder, f"{split}.json")
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def load_task(data_dir, task, train_size, test_size, seed, max_chars, name_the_task=False):
    """`{"train": [...], "test": [...], "labels": [...], "source": "..."}` of prompt / answer examples."""
    folder = task_folder(data_dir, task)
    with open(os.path.join(folder, "labels.json"), encoding="utf-8") as handle:
        labels = json.load(handle)
    train, dev, test = (read_split(folder, split) for split in ("train", "dev", "test"))
    rng = random.Random(f"{task}-{seed}")
    # Examples held out when a split has to be carved from another file: 200 (a fifth of a small file) or test_size if
    # more, so that asking for fewer test examples takes a prefix of the same held-out set and leaves the training
    # examples (and the cached base) as they are.
    def held_out(rows):
        return max(test_size, min(200, len(rows) // 5))
    if train is not None and (test or dev) is not None:
        source, test = "train / " + ("test" if test is not None else "dev"), test if test is not None else dev
    elif train is not None:  # only train: hold out its last examples (shuffled first, reproducibly)
        train = list(train)
        rng.shuffle(train)
        cut = held_out(train)
        source, test, train = "train split in two", train[-cut:], train[:-cut]
    elif (test or dev) is not None:  # no train: split the evaluation file
        rows = list(test if test is not None else dev)
        rng.shuffle(rows)
        cut = held_out(rows)
        source, train, test = f"{'test' if test is not None else 'dev'} split in two", rows[cut:], rows[:cut]
    else:
        raise SystemExit(f"task {task!r}: {folder} holds no train, dev or test file")
    train, test = list(train), list(test)
    rng.shuffle(train)
    rng.shuffle(test)
    kind = TASK_TYPES[task]
    prefix = f"Task:{kind}\nDataset:{task}\n" if name_the_task else ""

    def example(row):
        text = row["sentence"][:max_chars]
        if kind == "COPA":
            prompt = f"{text}\nAnswer:"
        else:
            prompt = f"{INSTRUCTIONS[kind]}Option: {', '.join(labels)} \n{text}\nAnswer:"
        return {"prompt": prefix + prompt, "answer": " " + row["label"]}

    return {"train": [example(row) for row in train[:train_size]], "test": [example(row) for row in test[:test_size]],
            "labels": labels, "source": source}


# ----------------------------------------------------------------------------------------------- base model
def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def pretrained_base(data, args):
    """A small Llama and a BPE tokenizer trained on the training prompts of every benchmark task found under `--data`
    (answers unused), so that one cached base serves every order, the Standard and the Long; cached by content."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

    from pmoe.tasks import padding_collator

    texts = [example["prompt"] for task in data.values() for example in task["train"]]
    key = hashlib.sha256(json.dumps([texts[:50], len(texts), args.pretrain_steps, args.hidden_size,
                                     args.num_layers, args.vocab_size]).encode()).hexdigest()[:12]
    folder = os.path.join(args.cache_dir, f"cl-base-{key}")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        print(f"base model: cached at {folder}", flush=True)
        return LlamaForCausalLM.from_pretrained(folder).eval(), PreTrainedTokenizerFast.from_pretrained(folder)
    print(f"base model: training a tokenizer and pretraining a small Llama ({args.pretrain_steps} steps) on "
          f"{len(texts)} training texts, cached in {folder}", flush=True)
    tokenizer = train_tokenizer(texts, args.vocab_size)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 8 // 3,
        num_hidden_layers=args.num_layers, num_attention_heads=args.hidden_size // 64,
        num_key_value_heads=args.hidden_size // 64, max_position_embeddings=1024, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, tie_word_embeddings=True,
    ))
    rows = []
    for text in texts:
        ids = [BOS] + tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens] + [EOS]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
    training = TrainingArguments(
        output_dir=os.path.join(folder, "run"), per_device_train_batch_size=32, max_steps=args.pretrain_steps,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=max(1, args.pretrain_steps // 20),
        logging_steps=max(1, args.pretrain_steps // 10), save_strategy="no", report_to="none", use_cpu=True, seed=0,
    )
    Trainer(model, training, train_dataset=rows, data_collator=padding_collator(tokenizer)).train()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


def load_base(args, data):
    if args.model_name_or_path:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path).eval(), tokenizer
    corpus = {}
    for task in TASK_TYPES:  # every task with data, whichever order runs
        try:
            corpus[task] = data[task] if task in data else load_task(
                args.data, task, args.train_size, args.test_size, 0, args.max_chars, args.name_the_task)
        except SystemExit:
            print(f"base model: no data for {task}, left out of the pretraining text", flush=True)
    return pretrained_base(corpus, args)


# --------------------------------------------------------------------------------------- encode and evaluate
def prompt_ids(tokenizer, prompt, max_tokens):
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    # Keep the end (options and "Answer:" come last after the text is cut to max_chars; the instruction leads).
    return [tokenizer.bos_token_id] + ids[-max_tokens:]


def encode(examples, tokenizer, max_tokens):
    rows = []
    for example in examples:
        prompt = prompt_ids(tokenizer, example["prompt"], max_tokens)
        answer = tokenizer(example["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                     "labels": [-100] * len(prompt) + answer})
    return rows


def left_padded(tokenizer, examples, max_tokens):
    prompts = [prompt_ids(tokenizer, e["prompt"], max_tokens) for e in examples]
    length = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (length - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return input_ids, attention_mask


def make_evaluate(max_tokens, batch_size=64):
    @torch.no_grad()
    def evaluate(model, tokenizer, examples):
        """Exact match of the greedy answer (stripped), in batches, no task id."""
        model.eval()
        answers = []
        longest = max(len(tokenizer(e["answer"], add_special_tokens=False)["input_ids"]) for e in examples) + 1
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            input_ids, attention_mask = left_padded(tokenizer, chunk, max_tokens)
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=longest,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)
            answers += tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        return exact_match([a.strip() for a in answers], [e["answer"].strip() for e in examples]), None

    return evaluate


def routing_row(picks: list[int], index: int, tasks: list[str]) -> dict:
    """One task's routing result from the expert each of its test prompts went to (expert i = i-th task)."""
    return {"accuracy": sum(p == index for p in picks) / len(picks),
            "routed_to": {other: picks.count(i) for i, other in enumerate(tasks)}}


@torch.no_grad()
def routing_accuracy(model, tokenizer, data, tasks, max_tokens, batch_size=64):
    """Per task: the share of its test prompts whose gate picks its own expert (expert i = i-th task), and the
    confusion row (how many went to each expert)."""
    model.eval()
    result = {}
    for index, task in enumerate(tasks):
        picks = []
        examples = data[task]["test"]
        for start in range(0, len(examples), batch_size):
            input_ids, attention_mask = left_padded(tokenizer, examples[start : start + batch_size], max_tokens)
            picks += model(input_ids=input_ids, attention_mask=attention_mask).routing_weights.argmax(-1).tolist()
        result[task] = routing_row(picks, index, tasks)
    return result


@torch.no_grad()
def pooled_router_features(base, tokenizer, examples, routers, max_tokens, batch_size=64):
    """`{name: [n, P] features}` for `routers` `{name: (router, layer)}`: each example's prompt as that router, reading
    the input of that layer, pools it. The default layout routes from an expert-free pass, which is the dense base
    model: one forward of the base gives every layer's hidden states, so the router kinds and layers (and the embedding
    screen, layer 0) are compared on the same pass."""
    pooled = {name: [] for name in routers}
    for start in range(0, len(examples), batch_size):
        input_ids, attention_mask = left_padded(tokenizer, examples[start : start + batch_size], max_tokens)
        hidden_states = base.model(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=True).hidden_states
        for name, (router, layer) in routers.items():
            features, _ = router.features(hidden_states[layer], attention_mask)
            pooled[name].append(features[:, 0])
    return {name: torch.cat(chunks) for name, chunks in pooled.items()}


@torch.no_grad()
def routing_only(base, tokenizer, data, tasks, kinds, layers, max_tokens):
    """Per router kind and input layer: grow one expert per task, fit its key on the task's training prompts (what the
    callback does before training it), then route every task's test prompts. Where the model has screens
    (`router_screen_margin`: the embedding screen and the first-layer screen), their keys are fitted on the same
    prompts and a second row routes as the model does: each prompt by the first screen sure of it, else by the router;
    `screened` counts the prompts each screen routed, `largest_wrong_margin` how close each came to a wrong decision on
    the prompts that reached it, `decisions_changed` the prompts routed otherwise than by the router alone. Returns
    `{label: routing_accuracy}`."""
    models = {}
    for kind in kinds:
        for layer in layers:
            options = {} if layer is None else {"router_input_layer": layer}
            model = PMoEForCausalLM.from_dense(copy.deepcopy(base), router_keys=kind, **options).eval()
            models[(kind, model.config.router_input_layer)] = model
    routers = {name: (model.model.routers[0], name[1]) for name, model in models.items()}
    routers.update({(*name, "screen", screen_layer): (screen, screen_layer) for name, model in models.items()
                    for screen_layer, screen in model.model._screens()})
    features = {task: {split: pooled_router_features(base, tokenizer, data[task][split], routers, max_tokens)
                       for split in ("train", "test")} for task in tasks}
    results = {}
    for (kind, layer), model in models.items():
        label = kind if layers == [None] else f"{kind}, layer {layer}"
        screens = model.model._screens()
        for task in tasks:
            index = model.add_expert(task)
            model.model.routers[0].experts[index].accumulate(features[task]["train"][(kind, layer)])
            for screen_layer, screen in screens:
                screen.experts[index].accumulate(features[task]["train"][(kind, layer, "screen", screen_layer)])
        per_task, per_task_screened = {}, {}
        for index, task in enumerate(tasks):
            _, gates = model.model.routers[0](features[task]["test"][(kind, layer)][:, None])
            picks = gates[:, 0].argmax(-1)
            per_task[task] = routing_row(picks.tolist(), index, tasks)
            if not screens:
                continue
            router_picks = picks
            unrouted = torch.ones_like(picks, dtype=torch.bool)  # no screen was sure of it yet
            screened, largest_wrong_margin = {}, {}
            for screen_layer, screen in screens:
                screen_features = features[task]["test"][(kind, layer, "screen", screen_layer)]
                screen_logits, screen_gates = screen(screen_features[:, None])
                sure = screen_is_sure(screen_logits[:, 0], model.config.router_screen_margin) & unrouted
                picks = torch.where(sure, screen_gates[:, 0].argmax(-1), picks)
                # How close the screen came to a wrong decision: the largest margin of its wrong top picks among the
                # prompts that reached it.
                values, indices = screen_logits[:, 0].topk(min(2, len(tasks)), dim=-1)
                margins = (values[:, 0] - values[:, -1])[(indices[:, 0] != index) & unrouted]  # (one task: none)
                screened[screen_layer] = int(sure.sum())
                largest_wrong_margin[screen_layer] = float(margins.max()) if len(margins) else None
                unrouted &= ~sure
            per_task_screened[task] = {**routing_row(picks.tolist(), index, tasks), "prompts": len(picks),
                                       "screened": screened, "largest_wrong_margin": largest_wrong_margin,
                                       "decisions_changed": int((picks != router_picks).sum())}
        results[label] = per_task
        if screens:
            results[f"{label} + screens"] = per_task_screened
    return results


# ---------------------------------------------------------------------------------------------------- report
SCREEN_NAMES = {0: "embedding", 1: "first-layer"}  # the screens by the layer whose input they read


def routing_markdown(results, args):
    lines = [f"Routing accuracy (%) per task, {args.test_size} test prompts each, keys fitted on {args.train_size} "
             f"training prompts per task; no task name in the prompt" + (" (named)" if args.name_the_task else "")
             + ".", ""]
    for order, by_kind in results.items():
        tasks = list(next(iter(by_kind.values())))
        lines += [f"Order {order}: {', '.join(tasks)}", "",
                  "| keys | " + " | ".join(tasks) + " | mean | routed by the screens |",
                  "|---|" + "---|" * (len(tasks) + 2)]
        for kind, per_task in by_kind.items():
            values = [100 * per_task[t]["accuracy"] for t in tasks]
            screened = "-"
            if "screened" in per_task[tasks[0]]:
                prompts, parts = sum(per_task[t]["prompts"] for t in tasks), []
                for screen_layer in per_task[tasks[0]]["screened"]:
                    share = sum(per_task[t]["screened"][screen_layer] for t in tasks) / prompts
                    margins = [per_task[t]["largest_wrong_margin"][screen_layer] for t in tasks
                               if per_task[t]["largest_wrong_margin"][screen_layer] is not None]
                    parts.append(f"{100 * share:.1f}% by the {SCREEN_NAMES[screen_layer]} screen" + (
                        f" (wrong top picks: margins up to {max(margins):.1f})" if margins else ""))
                changed = sum(per_task[t]["decisions_changed"] for t in tasks)
                screened = "; ".join(parts) + f"; {changed} of {prompts} decisions differ from the router's alone"
            lines.append(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in values)
                         + f" | {statistics.mean(values):.1f} | {screened} |")
        lines.append("")
    return "\n".join(lines)


def methods_markdown(summary, routing, args, tasks_by_order):
    orders = "; ".join(f"{order} ({', '.join(tasks)})" for order, tasks in tasks_by_order.items())
    caption = (f"Orders {orders}; {args.steps_per_task} steps of 32 examples per task; exact match (%) of the greedy "
               f"answer on {args.test_size} test prompts per task, no task id; mean ± std over orders x seeds "
               f"{args.seeds}; LoRA / expert rank {args.rank}.")
    lines = [results_table(summary, caption).rstrip("\n"), "", "Runs behind each row (order / seed):"]
    for method, row in summary.items():
        lines.append(f"- {method}: " + ", ".join(f"{order} / {seed}" for order, seed in row["runs"]))
    for method, per_order in routing.items():
        lines += ["", f"Routing accuracy (%) of {method} after the last task:"]
        for order, per_task in per_order.items():
            lines.append(f"- order {order}: " + ", ".join(f"{t} {100 * r['accuracy']:.1f}" for t, r in per_task.items()))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="O-LoRA's CL_Benchmark folder (a local copy)")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="instead of running: one table from these methods results (same settings)")
    parser.add_argument("--orders", nargs="+", default=["1", "2", "3"], choices=sorted(ORDERS))
    parser.add_argument("--tasks", nargs="+", help="one explicit task order instead of --orders")
    parser.add_argument("--substitute", nargs="*", default=[], metavar="OLD=NEW",
                        help="replace a task in every order, e.g. yahoo=yelp where yahoo's files are missing")
    parser.add_argument("--routing-only", action="store_true", help="router key kinds' routing accuracy only")
    parser.add_argument("--router-keys", nargs="+", default=ROUTER_KEY_KINDS, choices=ROUTER_KEY_KINDS)
    parser.add_argument("--router-input-layers", nargs="+", type=int, default=None, metavar="LAYER",
                        help="--routing-only: the layers whose input the router reads (0: the embeddings), one "
                             "result per layer (default: the config's default, the shallow/deep boundary)")
    parser.add_argument("--methods", nargs="+", default=["pmoe", "pmoe-lda", "sequential-ft", "sequential-lora",
                                                          "o-lora", "replay", "multitask"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-size", type=int, default=1000, help="training examples per task")
    parser.add_argument("--test-size", type=int, default=200, help="test examples per task")
    parser.add_argument("--max-chars", type=int, default=400, help="text cut to this many characters")
    parser.add_argument("--max-tokens", type=int, default=160, help="prompt tokens kept (the end)")
    parser.add_argument("--name-the-task", action="store_true", help="O-LoRA's Task:/Dataset: prompt prefix")
    parser.add_argument("--steps-per-task", type=int, default=200)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--expert-lr", type=float, default=3e-3)
    parser.add_argument("--full-lr", type=float, default=1e-3)
    parser.add_argument("--model-name-or-path", default=None, help="a Llama-family checkpoint instead of the base")
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "pmoe"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few examples and steps (keeps the script working)")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--name", default=None, help="results file stem (default: cl-benchmark[-routing])")
    args = parser.parse_args()
    if args.merge:
        os.makedirs(args.output_dir, exist_ok=True)
        return merge(args.merge, os.path.join(args.output_dir, args.name or "cl-benchmark"))
    if not args.data:
        parser.error("--data is required (O-LoRA's CL_Benchmark folder)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.train_size, args.test_size, args.steps_per_task, args.pretrain_steps = 16, 6, 2, 3
        args.hidden_size, args.vocab_size, args.seeds = 64, 300, args.seeds[:1]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    unknown_methods = [method for method in args.methods if method not in METHODS]
    if unknown_methods and not args.routing_only:
        raise SystemExit(f"unknown method(s) {unknown_methods}; choose from {METHODS}")
    started = time.time()
    substitutes = dict(item.split("=", 1) for item in args.substitute)
    orders = {"custom": args.tasks} if args.tasks else {o: ORDERS[o] for o in args.orders}
    orders = {o: [substitutes.get(t, t) for t in tasks] for o, tasks in orders.items()}
    all_tasks = sorted({t for tasks in orders.values() for t in tasks})
    unknown = [t for t in all_tasks if t not in TASK_TYPES]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {sorted(TASK_TYPES)}")
    data = {t: load_task(args.data, t, args.train_size, args.test_size, 0, args.max_chars, args.name_the_task)
            for t in all_tasks}
    for task, content in data.items():
        print(f"{task}: {len(content['train'])} train / {len(content['test'])} test ({content['source']})", flush=True)
    base, tokenizer = load_base(args, data)
    evaluate = make_evaluate(args.max_tokens)
    name = args.name or ("cl-benchmark-routing" if args.routing_only else "cl-benchmark")
    stem = os.path.join(args.output_dir, f"{name}-quick" if args.quick else name)
    os.makedirs(args.output_dir, exist_ok=True)
    record = {"args": vars(args), "orders": orders,
              "data": {t: {"source": d["source"], "train": len(d["train"]), "test": len(d["test"])}
                       for t, d in data.items()}}

    if args.routing_only:
        results = {}
        for order, tasks in orders.items():
            results[order] = routing_only(base, tokenizer, data, tasks, args.router_keys,
                                          args.router_input_layers or [None], args.max_tokens)
            for label, per_task in results[order].items():
                print(f"order {order} {label}: " + ", ".join(
                    f"{t} {100 * r['accuracy']:.1f}" for t, r in per_task.items()), flush=True)
        record.update(routing=results, seconds=time.time() - started)
        text = routing_markdown(results, args)
    else:
        runs = {method: [] for method in args.methods}
        routing = {method: {} for method in args.methods if method in PMOE_OPTIONS}
        workdir = os.path.join(args.output_dir, "tmp-runs")
        for order, tasks in orders.items():
            for seed in args.seeds:
                order_data = {t: {"rows": encode(data[t]["train"], tokenizer, args.max_tokens), "test": data[t]["test"]}
                              for t in tasks}
                baseline = [evaluate(base, tokenizer, data[t]["test"])[0] for t in tasks]
                for method in args.methods:
                    method_started = time.time()

                    def after_last_task(model, method=method, order=order, tasks=tasks):
                        routing[method][order] = routing_accuracy(model, tokenizer, data, tasks, args.max_tokens)
                        return {}

                    matrix, info = run_method(method, base, tokenizer, order_data, args, seed, workdir, tasks=tasks,
                                              evaluate_fn=evaluate, on_pmoe_done=after_last_task)
                    run = {"order": order, "seed": seed, "matrix": matrix, "baseline": baseline,
                           "seconds": time.time() - method_started, "metrics": continual_metrics(matrix, baseline),
                           **info}
                    runs[method].append(run)
                    with open(stem + "-partial.json", "w") as handle:  # survives an interrupted run
                        json.dump({**record, "runs": runs, "routing": routing}, handle)
                    print(f"order {order} seed {seed} {method}: LA {run['metrics']['LA']:.3f} OP "
                          f"{run['metrics']['OP']:.3f} BWT {run['metrics']['BWT']:+.3f} ({run['seconds']:.0f}s)",
                          flush=True)
        record.update(runs=runs, routing=routing, seconds=time.time() - started)
        text = methods_report(record, stem)
        os.remove(stem + "-partial.json")
    text += f"\nTotal wall time: {record['seconds']:.0f} s ({torch.get_num_threads()} CPU thread(s)).\n"
    write_results(stem, record, text)


def methods_report(record, stem) -> str:
    """Summary, markdown and figure of a methods run's `record` (runs and routing per method)."""
    args = argparse.Namespace(**record["args"])
    record["summary"] = {method: {**summarize(method_runs), "runs": [(run["order"], run["seed"]) for run in method_runs]}
                         for method, method_runs in record["runs"].items()}
    save_figure(stem + ".png", record["summary"])
    return methods_markdown(record["summary"], record["routing"], args, record["orders"])


def write_results(stem, record, text):
    with open(stem + ".json", "w") as handle:
        json.dump(record, handle, indent=2)
    with open(stem + ".md", "w") as handle:
        handle.write(text)
    print(text)


def merge(paths, stem):
    """One table from several methods runs made with the same settings (e.g. methods or orders run side by side in
    separate processes, or a `-partial.json` of an interrupted run): their runs and routing are put together."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            records.append(json.load(handle))
    if any("runs" not in record for record in records):
        raise SystemExit("--merge takes methods runs (not --routing-only results)")
    ignored = {"methods", "orders", "tasks", "seeds", "threads", "name", "output_dir", "merge"}
    settings = [{k: v for k, v in record["args"].items() if k not in ignored} for record in records]
    if any(other != settings[0] for other in settings[1:]):
        raise SystemExit(f"--merge: the runs differ in settings: {settings}")
    merged = {"args": {**records[0]["args"], "merged_from": [os.path.basename(p) for p in paths]}, "orders": {},
              "data": records[0]["data"], "runs": {}, "routing": {}, "seconds": 0.0}
    for record in records:
        merged["orders"].update(record["orders"])
        merged["seconds"] += record.get("seconds", sum(run["seconds"] for runs in record["runs"].values() for run in runs))
        for method, runs in record["runs"].items():
            merged["runs"].setdefault(method, []).extend(runs)
        for method, per_order in record["routing"].items():
            merged["routing"].setdefault(method, {}).update(per_order)
    merged["args"]["seeds"] = sorted({run["seed"] for runs in merged["runs"].values() for run in runs})
    text = methods_report(merged, stem)
    sources = ", ".join(os.path.basename(path) for path in paths)
    text += f"\nCompute time: {merged['seconds']:.0f} s, summed over the merged runs ({sources}).\n"
    write_results(stem, merged, text)


if __name__ == "__main__":
    main()
