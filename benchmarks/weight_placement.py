#!/usr/bin/env python
"""Why `speed.py` gives every model the Llama's own weight tensors: what a separate copy of the weights does to
decode on this machine. At `speed.py`'s shape, in one process, after `speed.py`'s set-up (the task features'
forwards):

- the one-token matmuls over every linear weight of the Llama and of a PMoE built with its own copy (`from_dense`),
  interleaved: the same shapes and math, only the memory differs;
- decode against the Llama (`speed.interleaved_decode`) of PMoE with every gate at zero (no expert computed: only the
  code and the memory differ from the Llama) and of `pmoe-8` (one routed expert), each with its own copy of the
  weights and with the Llama's tensors shared.

    python benchmarks/weight_placement.py           # about 3 minutes on 2 CPU cores
    python benchmarks/weight_placement.py --quick   # tiny shapes (keeps the script working)
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import speed  # noqa: E402


class ZeroGates(torch.nn.Module):
    """The model with every sequence gate at zero: no expert runs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        if kwargs.get("routing_weights") is not None:
            kwargs["routing_weights"] = torch.zeros_like(kwargs["routing_weights"])
        return self.model(**kwargs)


def linear_weights(model) -> list[torch.Tensor]:
    return [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)]


def matmul_ms(weight_sets: dict, rounds: int) -> dict:
    """Median ms of one-token `F.linear` over each set of weights, the sets taking turns (order flipped each round)."""
    inputs = {w.shape[1]: torch.randn(1, 1, w.shape[1]) for weights in weight_sets.values() for w in weights}
    times = {name: [] for name in weight_sets}
    names = list(weight_sets)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for weight in weight_sets[name]:
                F.linear(inputs[weight.shape[1]], weight)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    shape = dict(speed.QUICK if args.quick else speed.FULL, expert_layers="all")
    device = torch.device("cpu")
    input_ids, _ = speed.inputs(shape, device)
    llama = speed.make_llama(shape, device, torch.float32)
    experts = shape["experts"][1]
    features = speed.task_features(llama, shape, experts, speed.router_input_layer(shape))
    models = {sharing: speed.make_pmoe(llama, shape, experts, True, features, share_weights=sharing == "shared")
              for sharing in ("copy", "shared")}
    addresses = [hex(linear_weights(model)[0].data_ptr()) for model in (models["copy"], llama)]
    print(f"{torch.get_num_threads()} threads; PMoE's copy of the weights at {addresses[0]}, the Llama's at "
          f"{addresses[1]}")
    ms = matmul_ms({"llama": linear_weights(llama), "pmoe copy": linear_weights(models["copy"])},
                   rounds=6 if args.quick else 30)
    print(f"one-token matmuls over all {len(linear_weights(llama))} linear weights: Llama's {ms['llama']:.2f} ms, "
          f"PMoE's copy {ms['pmoe copy']:.2f} ms (x{ms['pmoe copy'] / ms['llama']:.3f})")
    for sharing, model in models.items():
        for name, timed in (("every gate at zero", ZeroGates(model)), (f"pmoe-{experts}, one routed expert", model)):
            decode = speed.interleaved_decode({"llama": (llama, False), name: (timed, True)}, input_ids,
                                              shape["decode"], device, repeats=1 if args.quick else 3, warmup=1)
            print(f"decode, weights {sharing:6s}, {name}: x{decode[name] / decode['llama']:.3f} the Llama "
                  f"({1000 * decode['llama']:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
