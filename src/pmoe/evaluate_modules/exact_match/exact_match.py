"""Exact match of answer strings, as an `evaluate` metric that needs no network.

Load it offline with `evaluate.load(pmoe.evaluate_module_path("exact_match"))`. The math is
`pmoe.metrics.exact_match` (SQuAD's answer normalisation by default).
"""

import datasets
import evaluate

from pmoe import evaluate_support  # a module, not the class: evaluate loads the first Metric class it finds
from pmoe.metrics import exact_match


_DESCRIPTION = """
Exact match: the fraction of predictions equal to their reference. By default both strings are first normalised as in
SQuAD (`pmoe.metrics.normalize_answer`: lower case, punctuation and the articles a/an/the removed, white space
squeezed); with `normalize=False` only surrounding white space is stripped. Note that the Hub's `exact_match` does not
normalise by default; this one does, as pmoe's examples score their answers.
"""

_CITATION = """
@inproceedings{rajpurkar2016squad,
  title={{SQuAD}: 100,000+ Questions for Machine Comprehension of Text},
  author={Rajpurkar, Pranav and Zhang, Jian and Lopyrev, Konstantin and Liang, Percy},
  booktitle={Proceedings of EMNLP},
  year={2016}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): predicted answers.
    references (`list` of `str`): reference answers, one per prediction.
    normalize (`bool`, defaults to `True`): SQuAD normalisation before comparing; `False` strips white space only.
Returns:
    exact_match (`float`): in [0, 1]; 0.0 for no predictions.
Examples:
    >>> em = evaluate.load(pmoe.evaluate_module_path("exact_match"))
    >>> em.compute(predictions=["The Cat!", "dog"], references=["cat", "a bird"])
    {'exact_match': 0.5}
    >>> em.compute(predictions=["The Cat!", "dog"], references=["cat", "a bird"], normalize=False)
    {'exact_match': 0.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate_support.PMoEMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://rajpurkar.github.io/SQuAD-explorer/"],
        )

    def _score(self, predictions, references, normalize=True):
        return {"exact_match": exact_match(predictions, references, normalize=normalize)}
