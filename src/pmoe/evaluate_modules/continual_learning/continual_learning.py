"""Continual-learning metrics (LA, OP, BWT, FWT, forgetting) of an accuracy matrix, as an `evaluate` metric.

Load it offline with `evaluate.load(pmoe.evaluate_module_path("continual_learning"))`. The math is
`pmoe.metrics.continual_metrics`; this file only adapts it to `evaluate`.
"""

import datasets
import evaluate

from pmoe import evaluate_support  # a module, not the class: evaluate loads the first Metric class it finds
from pmoe.metrics import continual_metrics


_DESCRIPTION = """
Continual-learning metrics of a square accuracy matrix: after training on task i (tasks 0..T-1 in order), the scores on
every task j, before any training the baseline scores.

Each example given to this metric is ONE ROW of the matrix (feature `accuracies`, a sequence of T floats): row i holds
the scores on tasks 0..T-1 after training task i. So either pass the whole matrix at once,
`compute(accuracies=matrix, baseline=...)`, or `add(accuracies=row)` after each task and `compute(baseline=...)` at the
end. Rows are kept in the order they were added (add them from one process, in task order).

- LA (learning accuracy): mean of the diagonal, how well each task was learned while it was current.
- OP (overall performance): mean of the last row, the final score over all tasks.
- BWT (backward transfer): mean over j < T-1 of `matrix[T-1][j] - matrix[j][j]`; negative means forgetting.
- FWT (forward transfer, only with `baseline`): mean over j > 0 of `matrix[j-1][j] - baseline[j]`, what training the
  earlier tasks did for task j before it was trained.
- forgetting (per task j < T-1): `max_{j <= i < T-1} matrix[i][j] - matrix[T-1][j]` (Chaudhry et al., 2018).
"""

_CITATION = """
@inproceedings{lopez2017gradient,
  title={Gradient Episodic Memory for Continual Learning},
  author={Lopez-Paz, David and Ranzato, Marc'Aurelio},
  booktitle={Advances in Neural Information Processing Systems},
  year={2017}
}
@inproceedings{chaudhry2018riemannian,
  title={Riemannian Walk for Incremental Learning: Understanding Forgetting and Intransigence},
  author={Chaudhry, Arslan and Dokania, Puneet K. and Ajanthan, Thalaiyasingam and Torr, Philip H. S.},
  booktitle={European Conference on Computer Vision},
  year={2018}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    accuracies (`list` of `list` of `float`): the rows of the T x T accuracy matrix, row i = the scores on every task
        after training task i (one example per row; with `add`, one row at a time).
    baseline (`list` of `float`, optional): the T scores before any training; needed for FWT.
Returns:
    num_tasks (`int`): T.
    LA (`float`): learning accuracy.
    OP (`float`): overall performance.
    BWT (`float`): backward transfer (0.0 for one task).
    FWT (`float`): forward transfer, only when `baseline` is given (0.0 for one task).
    forgetting (`list` of `float`): forgetting of each task but the last.
Raises:
    ValueError: the matrix is not square (or empty), or `baseline` does not have T scores.
Examples:
    >>> cl = evaluate.load(pmoe.evaluate_module_path("continual_learning"))
    >>> cl.compute(accuracies=[[1.0, 0.25], [0.5, 0.75]], baseline=[0.0, 0.0])
    {'num_tasks': 2, 'LA': 0.875, 'OP': 0.625, 'BWT': -0.5, 'forgetting': [0.5], 'FWT': 0.25}
    >>> for row in ([1.0, 0.25], [0.5, 0.75]):  # one row after each task
    ...     cl.add(accuracies=row)
    >>> cl.compute(baseline=[0.0, 0.0])["BWT"]
    -0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ContinualLearning(evaluate_support.PMoEMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"accuracies": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/1706.08840", "https://arxiv.org/abs/1801.10112"],
        )

    def _score(self, accuracies, baseline=None):
        return continual_metrics([list(row) for row in accuracies], baseline)
