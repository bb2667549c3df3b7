"""`pmoe demo`: the core workflow end to end on a tiny model, offline, in well under a minute on 2 CPU cores.

1. build a small random Llama in code and convert it (`PMoEForCausalLM.from_dense`): identical logits;
2. grow one expert per task and train it on that task's (synthetic) data while everything else stays frozen;
3. save, load back through `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, compare and generate.

The continual-learning demo with a Trainer, real tasks and accuracy matrices replaces this once it exists.
"""

import os
import tempfile
import time

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from .modeling_pmoe import PMoEForCausalLM


VOCAB = 64
TASKS = {
    # Each task is a next-token rule over random sequences: what the expert must learn for it.
    "count-up": lambda x: (x + 1) % VOCAB,
    "count-down": lambda x: (x - 1) % VOCAB,
}


def task_batch(rule, generator, batch=16, length=12):
    start = torch.randint(4, VOCAB, (batch, 1), generator=generator)
    sequence = [start]
    for _ in range(length - 1):
        sequence.append(rule(sequence[-1]))
    return torch.cat(sequence, dim=1)


def next_token_accuracy(model, rule, generator):
    ids = task_batch(rule, generator, batch=64)
    with torch.no_grad():
        predictions = model(input_ids=ids).logits[:, :-1].argmax(-1)
    return (predictions == ids[:, 1:]).float().mean().item()


def run_demo(output_dir: str | None = None, steps_per_task: int = 60, seed: int = 0) -> dict:
    started = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ).eval()
    model = PMoEForCausalLM.from_dense(dense, num_shallow_layers=2, expert_rank=8).eval()
    probe = task_batch(TASKS["count-up"], generator)
    with torch.no_grad():
        conversion_diff = (model(input_ids=probe).logits - dense(input_ids=probe).logits).abs().max().item()
    print(f"converted LlamaForCausalLM -> PMoEForCausalLM (2 shallow + 2 deep layers): max |logit diff| = "
          f"{conversion_diff:.1e}")

    accuracy = {}
    for task, rule in TASKS.items():
        index = model.add_expert(task)
        frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=3e-3)
        model.train()
        progress = tqdm(range(steps_per_task), desc=f"expert {index} ({task})", leave=False)
        for _ in progress:
            ids = task_batch(rule, generator)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            progress.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        unchanged = all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
        accuracy[task] = next_token_accuracy(model, rule, generator)
        print(f"expert {index} '{task}': trained {sum(p.numel() for p in trainable):,} parameters, "
              f"next-token accuracy {accuracy[task]:.0%}, frozen weights bit-identical: {unchanged}")

    # Without a task id the router decides which expert answers: how much of each earlier task survived?
    final = {task: next_token_accuracy(model, rule, generator) for task, rule in TASKS.items()}
    print("accuracy on every task after all of them (no task id): "
          + ", ".join(f"{task} {value:.0%} (was {accuracy[task]:.0%})" for task, value in final.items()))

    output_dir = output_dir or os.path.join(tempfile.gettempdir(), "pmoe-demo")
    model.save_pretrained(output_dir)
    loaded = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True).eval()
    with torch.no_grad():
        identical = torch.equal(loaded(input_ids=probe).logits, model(input_ids=probe).logits)
        generated = loaded.generate(input_ids=probe[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"saved to {output_dir} ({', '.join(sorted(os.listdir(output_dir)))})")
    print(f"reloaded with AutoModelForCausalLM(trust_remote_code=True): experts {loaded.config.expert_tasks}, "
          f"identical logits: {identical}")
    print(f"generate from {probe[0, :4].tolist()}: {generated[0, 4:].tolist()}")
    print(f"done in {time.time() - started:.1f}s")
    return {"conversion_diff": conversion_diff, "accuracy": accuracy, "final_accuracy": final,
            "identical_after_reload": identical,
            "output_dir": output_dir}
