"""`pmoe demo`: continual learning end to end on a tiny model, offline, in about a minute on 2 CPU cores.

1. build a small random Llama in code and convert it (`PMoEForCausalLM.from_dense`): identical logits;
2. train three tasks one after another with `Trainer` + `PMoEContinualCallback` (one expert per task, everything else
   frozen), and after each task measure every task seen so far, without a task id: the accuracy matrix;
3. save, load back through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, compare and generate.

The tasks are next-token rules behind a task marker (the "instruction"): count up, count down, repeat the last two
tokens. The base model is random, so this shows the mechanics and forgetting, not language ability; the benchmark
(`benchmarks/`) has the quality numbers against the usual baselines.
"""

import os
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from .modeling_pmoe import PMoEForCausalLM
from .trainer_callbacks import PMoEContinualCallback


VOCAB = 64
PROMPT, ANSWER = 5, 6
TASKS = {
    # name: (marker token, rule giving the next token from the sequence so far)
    "count-up": (1, lambda seq: (seq[-1] + 1) % VOCAB),
    "count-down": (2, lambda seq: (seq[-1] - 1) % VOCAB),
    "repeat-two": (3, lambda seq: seq[-2]),
}


def make_examples(task: str, count: int, generator: torch.Generator) -> list[dict]:
    marker, rule = TASKS[task]
    examples = []
    for _ in range(count):
        sequence = [marker] + torch.randint(8, VOCAB, (2,), generator=generator).tolist()
        while len(sequence) < PROMPT + ANSWER:
            sequence.append(int(rule(sequence)))
        labels = [-100] * PROMPT + sequence[PROMPT:]
        examples.append({"input_ids": sequence, "attention_mask": [1] * len(sequence), "labels": labels})
    return examples


def answer_accuracy(model, examples: list[dict]) -> float:
    """Teacher-forced next-token accuracy on the answer tokens; the router sees only the prompt, as in training."""
    input_ids = torch.tensor([e["input_ids"] for e in examples])
    labels = torch.tensor([e["labels"] for e in examples])
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, labels=labels).logits
    predictions, targets = logits[:, :-1].argmax(-1), labels[:, 1:]
    scored = targets != -100
    return (predictions[scored] == targets[scored]).float().mean().item()


def run_demo(output_dir: str | None = None, steps_per_task: int = 150, seed: int = 0) -> dict:
    started = time.time()
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    output_dir = output_dir or os.path.join(tempfile.gettempdir(), "pmoe-demo")

    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    ).eval()
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2, expert_rank=8)
    probe = torch.tensor([e["input_ids"] for e in make_examples("count-up", 4, generator)])
    with torch.no_grad():
        conversion_diff = (model(input_ids=probe).logits - dense(input_ids=probe).logits).abs().max().item()
    print(f"converted LlamaForCausalLM -> PMoEForCausalLM (2 shallow + 2 deep layers): max |logit diff| = "
          f"{conversion_diff:.1e}")

    tasks = list(TASKS)
    test_sets = {task: make_examples(task, 64, generator) for task in tasks}
    callback = PMoEContinualCallback(tasks=tasks)
    matrix = []  # matrix[i][j]: accuracy on task j after training task i
    for task in tasks:
        args = TrainingArguments(
            output_dir=os.path.join(output_dir, "runs", task), per_device_train_batch_size=16,
            max_steps=steps_per_task, learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=50,
            save_strategy="no", report_to="none", use_cpu=True, seed=seed, disable_tqdm=False,
        )
        trainer = Trainer(model, args, train_dataset=make_examples(task, 16 * steps_per_task, generator),
                          callbacks=[callback])
        print(f"task '{task}': expert {model.config.num_experts - 1}, "
              f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
        trainer.train()
        matrix.append([answer_accuracy(model, test_sets[seen]) for seen in tasks[: len(matrix) + 1]])

    width = max(len(task) for task in tasks)
    print("\naccuracy on each task (columns) after training each task (rows), no task id at inference:")
    print(" " * (width + 2) + "  ".join(f"{task:>{width}}" for task in tasks))
    for task, row in zip(tasks, matrix):
        print(f"{task:>{width}}  " + "  ".join(f"{value:>{width}.0%}" for value in row))
    forgetting = [matrix[-1][j] - matrix[j][j] for j in range(len(tasks) - 1)]
    print(f"backward transfer (mean change on earlier tasks): {sum(forgetting) / len(forgetting):+.1%}")

    model.save_pretrained(output_dir)
    loaded = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        identical = torch.equal(loaded(input_ids=probe).logits, model.eval()(input_ids=probe).logits)
    print(f"\nsaved to {output_dir}; reloaded with AutoModelForCausalLM(trust_remote_code=True): experts "
          f"{loaded.config.expert_tasks}, identical logits: {identical}")
    for task in tasks:
        prompt = torch.tensor([test_sets[task][0]["input_ids"][:PROMPT]])
        with torch.no_grad():
            out = loaded.generate(input_ids=prompt, max_new_tokens=ANSWER, do_sample=False, pad_token_id=0)
        expert = int(loaded(input_ids=prompt).routing_weights.argmax())
        print(f"  {task:>{width}}: {prompt[0].tolist()} -> {out[0, PROMPT:].tolist()}  (routed to expert {expert})")
    print(f"done in {time.time() - started:.0f}s")
    return {"conversion_diff": conversion_diff, "accuracy_matrix": matrix, "identical_after_reload": identical,
            "output_dir": output_dir}
