# Copyright 2026 The pmoe authors. Licensed under the Apache License, Version 2.0.
"""Every figure pmoe draws, in one place: `pmoe demo`, `pmoe report` and the benchmarks call these, so a results file
looks the same whichever of them draws it. matplotlib is imported only when a figure is drawn (Agg backend).

- `accuracy_matrix_figure`: accuracy matrices (every task after every task) side by side, LA / OP / BWT in each
  title, optionally the router's routing matrix (share of each task's prompts sent to each expert) next to them.
- `method_summary_figure`: LA / OP / BWT per method as bars (mean ± std over seeds when given), leaving out the metrics
  that mean nothing for a method (`metric_applies`).
- `router_figure`: a checkpoint's router usage per expert and how much data each fitted key has seen.
"""

import math


SUMMARY_METRICS = ("LA", "OP", "BWT")


def metric_applies(method: str, metric: str) -> bool:
    """Whether `metric` means something for `method`: a multitask model is one model trained on every task at once
    (only OP), single-task LoRA is one adapter per task (only LA); every continual method has all three."""
    return not (method == "multitask" and metric != "OP" or method == "single-task-lora" and metric != "LA")


def metric_value(value) -> float:
    """A metric as a number: plain, `{"mean": ..., "std": ...}`, or missing (NaN)."""
    if isinstance(value, dict):
        value = value.get("mean")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def metric_std(value) -> float:
    return float(value.get("std") or 0.0) if isinstance(value, dict) else 0.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _annotate(axis, matrix):
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not math.isnan(value):
                axis.text(j, i, f"{value:.0%}", ha="center", va="center", color="white" if value < 0.6 else "black",
                          fontsize=8)


def accuracy_matrix_figure(tasks: list[str], panels: list[tuple[str, list[list[float]], dict]],
                           routing: list[list[float]] | None = None):
    """`panels`: `(title, matrix, metrics)` each, `matrix[i][j]` the score on task j after training task i, `metrics`
    its LA / OP / BWT (numbers or `{"mean", "std"}`). `routing[i][e]`: the share of task i's test prompts the router
    sent to expert e (drawn as a last panel)."""
    plt = _pyplot()
    count = len(panels) + (routing is not None)
    figure, axes = plt.subplots(1, count, figsize=(1.2 + 4.4 * count, 4.4), squeeze=False, layout="constrained")
    axes = list(axes[0])
    for axis, (title, matrix, metrics) in zip(axes, panels):
        image = axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        shown = [f"{key} {metric_value(metrics.get(key)):{'+' if key == 'BWT' else ''}.1%}" for key in SUMMARY_METRICS
                 if not math.isnan(metric_value(metrics.get(key)))]
        axis.set_title(f"{title}\n{', '.join(shown)}", fontsize=10)
        axis.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
        axis.set_yticks(range(len(tasks)), [f"after {task}" for task in tasks] if axis is axes[0] else [])
        axis.set_xlabel("evaluated task")
        _annotate(axis, matrix)
    figure.colorbar(image, ax=axes[: len(panels)], fraction=0.03)
    if routing is not None:
        axis = axes[-1]
        axis.imshow(routing, vmin=0, vmax=1, cmap="magma")
        axis.set_title("PMoE router: share of each task's test prompts\nsent to each expert (no task id)", fontsize=10)
        axis.set_xticks(range(len(routing[0])), [f"expert {e}" for e in range(len(routing[0]))], rotation=30,
                        ha="right")
        axis.set_yticks(range(len(tasks)), tasks)
        _annotate(axis, routing)
    return figure


def method_summary_figure(summary: dict[str, dict], tasks: list[str] | None = None, seeds: list | None = None,
                          ylabel: str = "score (%)"):
    """Bars of LA / OP / BWT per method (`summary[method][metric]`: a number or `{"mean", "std"}`); a metric that
    does not apply to a method (`metric_applies`) or is missing is left out, not drawn as 0."""
    plt = _pyplot()
    methods = list(summary)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(methods) + 2), 4.6))
    width = 0.8 / len(SUMMARY_METRICS)
    for offset, metric in enumerate(SUMMARY_METRICS):
        shown = [metric_applies(method, metric) for method in methods]
        values = [100 * metric_value(summary[method].get(metric)) if ok else math.nan
                  for method, ok in zip(methods, shown)]
        errors = [100 * metric_std(summary[method].get(metric)) if ok else 0.0 for method, ok in zip(methods, shown)]
        positions = [index + (offset - 1) * width for index in range(len(methods))]
        axis.bar(positions, values, width, yerr=errors, capsize=2, label=metric)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
    axis.set_ylabel(ylabel)
    title = "continual learning: LA, OP, BWT per method"
    if tasks:
        title += f"\ntasks {', '.join(map(str, tasks))}" + (f"; mean ± std over seeds {seeds}" if seeds else "")
    axis.set_title(title, fontsize=10)
    axis.legend()
    return figure


def router_figure(summary: dict):
    """A checkpoint's router (`pmoe info --json`'s summary): usage share per expert (a routers x experts map with one
    router per deep layer) and, with fitted keys, the sequences / tokens each key was fitted on."""
    plt = _pyplot()
    experts = summary["experts"]
    labels = [f"{expert['index']}: {expert['task']}" for expert in experts]
    unit = summary["router"]["key_sample_unit"]
    figure, axes = plt.subplots(1, 2 if unit else 1, figsize=(5.5 * (2 if unit else 1), 4.2), squeeze=False)
    per_router = summary["router"]["usage_per_router"]
    usage_axis = axes[0][0]
    if len(per_router) > 1:  # one router per deep layer: routers x experts
        shares = [[value / sum(row) if sum(row) > 0 else 0.0 for value in row] for row in per_router]
        image = usage_axis.imshow(shares, vmin=0, vmax=1, cmap="magma", aspect="auto")
        usage_axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        usage_axis.set_ylabel("router")
        figure.colorbar(image, ax=usage_axis, fraction=0.05)
    else:
        shares = [expert["usage_share"] or 0.0 for expert in experts]
        usage_axis.bar(range(len(labels)), [100 * share for share in shares], color="tab:purple")
        usage_axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        usage_axis.set_ylabel("share of gate mass in training (%)")
    recorded = summary["router"]["usage_total"] > 0
    usage_axis.set_title("router usage per expert" + ("" if recorded else "\n(no training forwards recorded)"),
                         fontsize=10)
    if unit:
        counts = [sum(expert["key_samples"]) / len(expert["key_samples"]) for expert in experts]
        axes[0][1].bar(range(len(labels)), counts, color="tab:green")
        axes[0][1].set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        axes[0][1].set_ylabel(f"training {unit}")
        axes[0][1].set_title(f"fitted router keys: {unit} each key was fitted on", fontsize=10)
    figure.suptitle(f"PMoE router: {summary['checkpoint']}", fontsize=10)
    return figure


def save_figure(figure, path: str):
    """Write `figure` to `path` (PNG at 110 dpi, tight) and free it."""
    import matplotlib.pyplot as plt

    try:
        figure.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(figure)
