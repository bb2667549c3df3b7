"""The one module that draws pmoe's figures (`pmoe.reporting`), as `pmoe demo`, `pmoe report` and the benchmarks use
it."""

import math

from pmoe import reporting


def bar_heights(figure):
    """`{metric: [height per method]}` of a `method_summary_figure`."""
    axis = figure.axes[0]
    return {container.get_label(): [patch.get_height() for patch in container.patches] for container in axis.containers
            if hasattr(container, "patches")}


def test_method_summary_leaves_out_the_metrics_that_mean_nothing():
    summary = {
        "pmoe": {"LA": {"mean": 0.6, "std": 0.01}, "OP": {"mean": 0.55, "std": 0.02}, "BWT": {"mean": 0.0, "std": 0.0}},
        "multitask": {"LA": {"mean": 0.7, "std": 0.0}, "OP": {"mean": 0.65, "std": 0.0}, "BWT": {"mean": 0.1}},
        "single-task-lora": {"LA": 0.62, "OP": 0.2, "BWT": -0.5},
    }
    heights = bar_heights(reporting.method_summary_figure(summary, ["a", "b"], [0, 1]))
    rounded = {metric: [None if math.isnan(value) else round(value, 6) for value in values]
               for metric, values in heights.items()}
    assert rounded == {"LA": [60.0, None, 62.0], "OP": [55.0, 65.0, None], "BWT": [0.0, None, None]}


def test_accuracy_matrices_with_the_routing_panel():
    tasks = ["a", "b"]
    panels = [("pmoe", [[0.9, 0.0], [0.9, 0.8]], {"LA": 0.85, "OP": 0.85, "BWT": 0.0}),
              ("sequential", [[0.9, 0.0], [0.1, 0.8]], {"LA": 0.85, "OP": 0.45, "BWT": -0.8})]
    figure = reporting.accuracy_matrix_figure(tasks, panels, routing=[[1.0, 0.0], [0.0, 1.0]])
    titles = [axis.get_title() for axis in figure.axes]
    assert "LA 85.0%, OP 45.0%, BWT -80.0%" in titles[1] and "router" in titles[2]
    assert [text.get_text() for text in figure.axes[2].texts] == ["100%", "0%", "0%", "100%"]
