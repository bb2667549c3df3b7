#!/usr/bin/env python
"""Continual fine-tuning of a causal LM with PMoE: train tasks in order, evaluate every task after each one.

In the style of transformers' examples: every option is a command-line flag (`--help` lists them), including all of
`TrainingArguments` (`--max_steps` and `--num_train_epochs` apply to each task).

    python examples/run_continual.py \\
        --model_name_or_path path/to/llama-or-pmoe --tasks data/sql.jsonl data/chat.csv path/to/TRACE/C-STANCE \\
        --output_dir out --max_steps 500 --per_device_train_batch_size 8 --learning_rate 2e-4

Tasks: a `.jsonl` / `.json` / `.csv` file with `prompt` and `answer` columns (split into train / test with
`--test_fraction`), a folder in the TRACE layout (`train.json` and `test.json`, or `eval.json`, each a JSON list of
`{"prompt": ..., "answer": ...}`; `.jsonl` and `.csv` files with those names work too), or a `datasets` name.

Metric: exact match of the greedy answer (normalised as in SQuAD), computed by `pmoe.metrics`; no metric is fetched
from the Hub. Output: `<output_dir>/continual_results.json` with the full accuracy matrix (every task after every
task, and before any training), LA, OP, BWT and FWT, and the final model in `<output_dir>/final`.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, HfArgumentParser, Trainer, TrainingArguments, set_seed

import pmoe
from pmoe.metrics import continual_metrics, exact_match
from pmoe.tasks import padding_collator


logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "A dense Llama / Mistral / Qwen2 / Qwen3 or a PMoE checkpoint."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    num_shallow_layers: int | None = field(default=None, metadata={"help": "S; default: half the layers."})
    expert_rank: int = field(default=8)
    expert_alpha: float | None = field(default=None, metadata={"help": "Default: 2 * expert_rank."})
    routing: str = field(default="sequence", metadata={"help": "sequence or token."})
    router_keys: str | None = field(default=None, metadata={"help": "gaussian, lda or learned (default: pmoe's)."})
    expert_layers: str | None = field(default=None, metadata={
        "help": "all (experts in every layer) or deep (the paper's asymmetric layout); default: pmoe's (all with "
                "sequence routing)."})
    distillation_alpha: float = field(default=0.0, metadata={"help": "Lifelong-MoE KL weight; 0 turns it off."})
    merge_every_n_steps: int | None = field(default=None, metadata={"help": "Merge experts every N steps."})
    merge_method: str = field(default="svd", metadata={"help": "svd or average."})


@dataclass
class DataArguments:
    tasks: list[str] = field(metadata={"help": "Task sources, in training order (files, TRACE folders, dataset names)."})
    task_names: list[str] | None = field(default=None, metadata={"help": "Default: the sources' base names."})
    prompt_column: str = field(default="prompt")
    answer_column: str = field(default="answer")
    test_fraction: float = field(default=0.1, metadata={"help": "Test share when a task is a single file."})
    max_train_examples: int | None = field(default=None)
    max_test_examples: int | None = field(default=None)
    max_length: int = field(default=512, metadata={"help": "Truncate prompt + answer to this many tokens."})
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length at evaluation."})
    eval_batch_size: int = field(default=16)


def load_task(source: str, args: DataArguments, seed: int) -> datasets.DatasetDict:
    """Train and test splits of one task, from a file, a TRACE-layout folder, or a `datasets` name."""
    if os.path.isdir(source):
        files = {}
        for split, candidates in (("train", ["train"]), ("test", ["test", "eval"])):
            for stem in candidates:
                for extension in ("json", "jsonl", "csv"):
                    path = os.path.join(source, f"{stem}.{extension}")
                    if os.path.isfile(path) and split not in files:
                        files[split] = path
        if set(files) != {"train", "test"}:
            raise ValueError(f"Task folder {source} needs train.json and test.json (or eval.json); found "
                             f"{sorted(os.listdir(source))}.")
        builder = "csv" if files["train"].endswith(".csv") else "json"
        splits = datasets.load_dataset(builder, data_files=files)
    elif os.path.isfile(source):
        builder = "csv" if source.endswith(".csv") else "json"
        whole = datasets.load_dataset(builder, data_files={"train": source})["train"]
        splits = whole.train_test_split(test_size=args.test_fraction, seed=seed)
    else:
        splits = datasets.load_dataset(source)
        if "test" not in splits:
            splits = splits["train"].train_test_split(test_size=args.test_fraction, seed=seed)
    for split in ("train", "test"):
        missing = {args.prompt_column, args.answer_column} - set(splits[split].column_names)
        if missing:
            raise ValueError(f"Task {source} ({split}) has no column(s) {sorted(missing)}; columns: "
                             f"{splits[split].column_names}. Use --prompt_column / --answer_column.")
    if args.max_train_examples:
        splits["train"] = splits["train"].select(range(min(args.max_train_examples, len(splits["train"]))))
    if args.max_test_examples:
        splits["test"] = splits["test"].select(range(min(args.max_test_examples, len(splits["test"]))))
    return splits


def tokenize_for_training(dataset, tokenizer, args: DataArguments):
    """input_ids = prompt + answer + eos; labels = -100 on the prompt (it routes the sequence and is not learned)."""

    def encode(example):
        prompt = tokenizer(str(example[args.prompt_column]), add_special_tokens=True)["input_ids"]
        answer = tokenizer(str(example[args.answer_column]), add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        input_ids = (prompt + answer)[: args.max_length]
        labels = ([-100] * len(prompt) + answer)[: args.max_length]
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}

    return dataset.map(encode, remove_columns=dataset.column_names)


@torch.no_grad()
def evaluate_task(model, tokenizer, test_set, args: DataArguments, description: str) -> float:
    """Exact match of greedy answers, no task id: the router picks the expert from each prompt."""
    model.eval()
    tokenizer.padding_side = "left"
    predictions = []
    prompts = [str(p) for p in test_set[args.prompt_column]]
    for start in tqdm(range(0, len(prompts), args.eval_batch_size), desc=description, leave=False):
        batch = tokenizer(prompts[start : start + args.eval_batch_size], return_tensors="pt", padding=True)
        batch = {key: value.to(model.device) for key, value in batch.items()}
        generated = model.generate(
            **batch, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        predictions += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return exact_match(predictions, [str(a) for a in test_set[args.answer_column]])


def build_model(model_args: ModelArguments):
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    if config.model_type == "pmoe":
        return pmoe.PMoEForCausalLM.from_pretrained(model_args.model_name_or_path)
    options = dict(expert_rank=model_args.expert_rank, routing=model_args.routing, router_keys=model_args.router_keys,
                   expert_layers=model_args.expert_layers, distillation_alpha=model_args.distillation_alpha)
    if model_args.expert_alpha is not None:
        options["expert_alpha"] = model_args.expert_alpha
    return pmoe.PMoEForCausalLM.from_dense(
        model_args.model_name_or_path, num_shallow_layers=model_args.num_shallow_layers, **options
    )


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    set_seed(training_args.seed)

    names = data_args.task_names or [os.path.splitext(os.path.basename(os.path.normpath(s)))[0] for s in data_args.tasks]
    if len(names) != len(data_args.tasks) or len(set(names)) != len(names):
        raise ValueError(f"--task_names must give one distinct name per task, got {names} for {data_args.tasks}.")
    tasks = {name: load_task(source, data_args, training_args.seed) for name, source in zip(names, data_args.tasks)}

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = build_model(model_args)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    baseline = [evaluate_task(model, tokenizer, tasks[name]["test"], data_args, f"base model on {name}")
                for name in names]
    logger.info(f"Before training: {dict(zip(names, baseline))}")
    callback = pmoe.PMoEContinualCallback(
        tasks=names, merge_every_n_steps=model_args.merge_every_n_steps, merge_method=model_args.merge_method
    )
    matrix = []
    base_output_dir = training_args.output_dir
    for name in names:
        training_args.output_dir = os.path.join(base_output_dir, "tasks", name)
        train_set = tokenize_for_training(tasks[name]["train"], tokenizer, data_args)
        trainer = Trainer(model, training_args, train_dataset=train_set, data_collator=padding_collator(tokenizer),
                          callbacks=[callback])
        trainer.train()
        row = [evaluate_task(model, tokenizer, tasks[seen]["test"], data_args, f"after {name}: {seen}")
               for seen in names]
        matrix.append(row)
        logger.info(f"After {name}: {dict(zip(names, row))}")
    training_args.output_dir = base_output_dir

    results = {"tasks": names, "metric": "exact_match", "baseline": baseline, "accuracy_matrix": matrix,
               **continual_metrics(matrix, baseline),
               "experts": model.config.expert_tasks, "expert_train_steps": model.config.expert_train_steps}
    os.makedirs(base_output_dir, exist_ok=True)
    with open(os.path.join(base_output_dir, "continual_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    model.save_pretrained(os.path.join(base_output_dir, "final"))
    tokenizer.save_pretrained(os.path.join(base_output_dir, "final"))
    print(json.dumps({key: results[key] for key in ("tasks", "accuracy_matrix", "LA", "OP", "BWT", "FWT")}, indent=2))
    return results


if __name__ == "__main__":
    main()
