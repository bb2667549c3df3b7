"""ROUGE-L F1 on white-space tokens, as an `evaluate` metric in pure Python (no nltk, no rouge_score, no network).

Load it offline with `evaluate.load(pmoe.evaluate_module_path("rouge_l"))`. The math is `pmoe.metrics.rouge_l`.
"""

import datasets
import evaluate

from pmoe import evaluate_support  # a module, not the class: evaluate loads the first Metric class it finds
from pmoe.metrics import rouge_l


_DESCRIPTION = """
ROUGE-L F1: per prediction/reference pair, with `lcs` the length of the longest common subsequence of their
white-space tokens, precision = lcs / #prediction tokens, recall = lcs / #reference tokens, F1 their harmonic mean
(0.0 when either side has no tokens); the result is the mean over pairs. Tokens are compared case-sensitively as they
are; `normalize=True` first applies SQuAD's answer normalisation (lower case, no punctuation, no articles). Unlike the
Hub's `rouge` (rouge_score), there is no stemming and no lower-casing or punctuation splitting by default, and one
reference per prediction; the output key `rougeL` is the same.
"""

_CITATION = """
@inproceedings{lin-2004-rouge,
  title={{ROUGE}: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out},
  pages={74--81},
  year={2004}
}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): generated texts.
    references (`list` of `str`): one reference text per prediction.
    normalize (`bool`, defaults to `False`): SQuAD normalisation of both texts before tokenising.
Returns:
    rougeL (`float`): mean ROUGE-L F1 in [0, 1]; 0.0 for no predictions.
Examples:
    >>> rouge = evaluate.load(pmoe.evaluate_module_path("rouge_l"))
    >>> rouge.compute(predictions=["the cat sat on the mat"], references=["the cat lay on a mat"])
    {'rougeL': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RougeL(evaluate_support.PMoEMetric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://aclanthology.org/W04-1013/"],
        )

    def _score(self, predictions, references, normalize=False):
        return {"rougeL": rouge_l(predictions, references, normalize=normalize)}
