#!/usr/bin/env python
"""What one routed expert adds to the projections of `benchmarks/speed.py`'s shape (8 layers x q/k/v/o/gate/up/down,
hidden 1024, intermediate 2816, rank 8), timed over all 56 `PMoELinear` modules at once, against the base layers
alone: the shipped forward (the update added into the base output in place, `addmm_`, or `addmv_` for one row) and
the out-of-place `addmm` it replaced (a new output allocated and the base output copied into it), at decode (one row)
and prefill (512 rows). Also the cost of looking the routed expert's tensors up per module call, through nn.Module
attributes (`module.experts[i].lora_A`) and as the shipped code does (`_concatenated`: plain dict look-ups).
The by-hand check behind the README's "Decode and the expert count".

    python benchmarks/expert_update.py            # about a minute on 2 CPU cores
    python benchmarks/expert_update.py --quick    # tiny shapes (keeps the script working)
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
import pmoe  # noqa: E402
from pmoe.experts_pmoe import PMoELinear, expert_rank_gates  # noqa: E402


def projections(hidden: int, intermediate: int, layers: int, rank: int) -> list[PMoELinear]:
    config = pmoe.PMoEConfig(hidden_size=hidden, intermediate_size=intermediate, expert_rank=rank, num_experts=1,
                             expert_tasks=["task"])
    shapes = [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]
    modules = []
    for _ in range(layers):
        for in_features, out_features in shapes:
            module = PMoELinear(in_features, out_features, False, config, with_experts=True).eval()
            for tensor in (module.experts[0].lora_A, module.experts[0].lora_B):
                torch.nn.init.normal_(tensor, std=0.02)
            modules.append(module)
    return modules


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    hidden, intermediate, layers, rank, rows = (64, 176, 2, 4, (1, 16)) if args.quick else (1024, 2816, 8, 8, (1, 512))
    modules = projections(hidden, intermediate, layers, rank)
    rank_gates = expert_rank_gates(torch.ones(1, 1, 1), rank, modules[0].scaling, torch.float32)
    for tokens in rows:
        inputs = [torch.randn(1, tokens, module.in_features) for module in modules]

        def base():
            for module, x in zip(modules, inputs):
                F.linear(x, module.weight)

        def shipped():  # (`forward` itself, as `out_of_place` below: no nn.Module call overhead in either)
            for module, x in zip(modules, inputs):
                module.forward(x, active_experts=(0,), rank_gates=rank_gates)

        def out_of_place():  # the forward before the in-place update, the same steps up to the last one
            for module, x in zip(modules, inputs):
                out = F.linear(x, module.weight, module.bias)
                gated, lora_b = module.gated_expert_input(lambda lora_a: F.linear(x, lora_a), None, (0,), rank_gates)
                rows = gated.reshape(-1, gated.shape[-1])
                torch.addmm(out.reshape(-1, out.shape[-1]), rows, lora_b.T).view(out.shape)

        repeats = 5 if args.quick else (60 if tokens == 1 else 12)
        times = {name: [] for name in ("base", "shipped", "out_of_place")}
        for _ in range(3):  # interleaved rounds: every variant sees the same machine state
            for name, fn in (("base", base), ("shipped", shipped), ("out_of_place", out_of_place)):
                times[name].append(median_seconds(fn, repeats))
        base_s = statistics.median(times["base"])
        print(f"{tokens} row(s), {len(modules)} projections: base layers {1000 * base_s:.2f} ms")
        for name in ("out_of_place", "shipped"):
            seconds = statistics.median(times[name])
            added = 1000 * (seconds - base_s)
            print(f"  {name:13s} {1000 * seconds:8.2f} ms  x{seconds / base_s:.3f}  (+{added:.2f} ms)")

    module, calls = modules[0], 20000

    def attribute_lookup():
        for _ in range(calls):
            expert = module.experts[0]
            expert.lora_A, expert.lora_B

    def dict_lookup():
        for _ in range(calls):
            module._concatenated((0,))

    for name, fn in (("nn.Module attributes", attribute_lookup), ("shipped dict look-ups", dict_lookup)):
        print(f"expert look-up, {name}: {1e6 * median_seconds(fn, 5) / calls:.2f} us per module call")


if __name__ == "__main__":
    main()
