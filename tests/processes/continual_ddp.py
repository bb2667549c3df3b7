"""Run under `torchrun --nproc_per_node 2`: two tasks, one Trainer each, DDP over gloo on CPU.

argv[2] (optional) is the router key kind. Rank 0 writes a JSON report to argv[1]: per task, whether every process holds the same parameters and buffers,
whether the earlier experts and the base weights stayed bit-identical, and whether the new expert trained.
"""

import hashlib
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import make_pmoe, task_dataset, without_task  # noqa: E402

from pmoe import PMoEContinualCallback  # noqa: E402


def digest(tensors) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(tensors[name].detach().cpu().contiguous().float().numpy().tobytes())
    return hasher.hexdigest()


def main(report_path, router_keys="gaussian"):
    model = make_pmoe(router_keys=router_keys)
    base_before = digest(model.base_parameters())
    callback = PMoEContinualCallback(tasks=["task-0", "task-1"])
    report = {"tasks": []}
    earlier = {}
    for task in range(2):
        args = TrainingArguments(
            output_dir=os.path.join(os.path.dirname(report_path), f"out-{task}"), per_device_train_batch_size=4,
            max_steps=3, learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            ddp_backend="gloo", disable_tqdm=True, seed=0,
        )
        trainer = Trainer(model, args, train_dataset=without_task(task_dataset(task)), callbacks=[callback])
        trainer.train()
        everything = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest(everything))
        new_expert = model.expert_parameters(task)
        report["tasks"].append({
            "world_size": dist.get_world_size(),
            "experts": list(model.config.expert_tasks),
            "same_on_every_rank": len(set(digests)) == 1,
            "earlier_experts_untouched": all(digest(model.expert_tensors(i)) == earlier[i] for i in earlier),
            "base_untouched": digest(model.base_parameters()) == base_before,
            "new_expert_trained": any(
                torch.count_nonzero(p).item() > 0 for n, p in new_expert.items() if n.endswith("lora_B")
            ),
            "key_count": model.model.routers[0].experts[task].count.item(),
        })
        earlier[task] = digest(model.expert_tensors(task))
    if dist.get_rank() == 0:
        with open(report_path, "w") as handle:
            json.dump(report, handle)
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
