"""Accuracy of integer labels, as an `evaluate` metric that needs no network (the Hub's `accuracy` is downloaded).

Load it offline with `evaluate.load(pmoe.evaluate_module_path("accuracy"))`. The math is `pmoe.metrics.accuracy`.
"""

import datasets
import evaluate

from pmoe import evaluate_support  # a module, not the class: evaluate loads the first Metric class it finds
from pmoe.metrics import accuracy


_DESCRIPTION = """
Accuracy: the fraction of predictions equal to their reference, (TP + TN) / (TP + TN + FP + FN) for binary labels.
Same inputs, options and output key as the Hub's `accuracy` metric (single-label), without scikit-learn or a download.
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`, defaults to `True`): `False` returns the (weighted) number of correct predictions instead.
    sample_weight (`list` of `float`, optional): a weight per example.
Returns:
    accuracy (`float`, or the count with `normalize=False`): 0.0 for no predictions.
Examples:
    >>> acc = evaluate.load(pmoe.evaluate_module_path("accuracy"))
    >>> acc.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])
    {'accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate_support.PMoEMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.accuracy_score.html"],
        )

    def _score(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": accuracy(predictions, references, normalize=normalize, sample_weight=sample_weight)}
