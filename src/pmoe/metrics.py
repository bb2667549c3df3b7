"""Continual-learning metrics from an accuracy matrix, and the per-task metrics the examples use.

The `evaluate` modules shipped in `pmoe/evaluate_modules` (see `pmoe.evaluate_module_path`) wrap these functions, so
the math lives here only.

`matrix[i][j]` is the score on task `j` after training tasks `0..i` (the full square: later tasks are measured too,
which forward transfer needs); `baseline[j]` is the score on task `j` before any training.

- LA (learning accuracy): mean of the diagonal, how well each task was learned while it was current.
- OP (overall performance): mean of the last row.
- BWT (backward transfer): mean over earlier tasks of `matrix[-1][j] - matrix[j][j]`; negative is forgetting.
- FWT (forward transfer): mean over `j > 0` of `matrix[j-1][j] - baseline[j]`, what earlier tasks did for task `j`
  before it was trained.
- forgetting[j]: `max_{i<T-1} matrix[i][j] - matrix[-1][j]` for `j < T-1` (Chaudhry et al.).
"""

import re
import string


PUNCTUATION = set(string.punctuation)


def _check_square(matrix):
    size = len(matrix)
    if size == 0 or any(len(row) != size for row in matrix):
        raise ValueError(
            "The accuracy matrix must be square (T rows of T scores: every task measured after every task), got rows "
            f"of lengths {[len(row) for row in matrix]}."
        )
    return size


def _check_pairs(predictions, references):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")


def continual_metrics(matrix: list[list[float]], baseline: list[float] | None = None) -> dict:
    """LA, OP, BWT, FWT (when `baseline` is given) and per-task forgetting of a square accuracy matrix."""
    size = _check_square(matrix)
    last = matrix[-1]
    result = {
        "num_tasks": size,
        "LA": sum(matrix[j][j] for j in range(size)) / size,
        "OP": sum(last) / size,
        "BWT": sum(last[j] - matrix[j][j] for j in range(size - 1)) / (size - 1) if size > 1 else 0.0,
        "forgetting": [max(matrix[i][j] for i in range(j, size - 1)) - last[j] for j in range(size - 1)],
    }
    if baseline is not None:
        if len(baseline) != size:
            raise ValueError(f"baseline has {len(baseline)} scores for {size} tasks.")
        result["FWT"] = sum(matrix[j - 1][j] - baseline[j] for j in range(1, size)) / (size - 1) if size > 1 else 0.0
    return result


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze white space (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(character for character in text if character not in PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str], normalize: bool = True) -> float:
    """Fraction of predictions equal to their reference after `normalize_answer` (or, with `normalize=False`, after
    stripping surrounding white space only); 0.0 for no predictions."""
    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    clean = normalize_answer if normalize else (lambda text: text.strip())
    return sum(clean(p) == clean(r) for p, r in zip(predictions, references)) / len(predictions)


def accuracy(predictions: list, references: list, normalize: bool = True, sample_weight: list[float] | None = None):
    """Fraction (or, with `normalize=False`, the weighted count) of predictions equal to their reference, as
    `sklearn.metrics.accuracy_score` on labels; 0.0 for no predictions."""
    _check_pairs(predictions, references)
    weights = [1.0] * len(predictions) if sample_weight is None else [float(weight) for weight in sample_weight]
    if len(weights) != len(predictions):
        raise ValueError(f"{len(weights)} sample weights for {len(predictions)} predictions.")
    correct = sum(weight for p, r, weight in zip(predictions, references, weights) if p == r)
    if not normalize:
        return correct
    total = sum(weights)
    return correct / total if total else 0.0


def _lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming over one row (O(len(first) * len(second)))."""
    if len(second) > len(first):
        first, second = second, first
    previous = [0] * (len(second) + 1)
    for token in first:
        current = [0]
        for index, other in enumerate(second):
            current.append(previous[index] + 1 if token == other else max(previous[index + 1], current[index]))
        previous = current
    return previous[-1]


def rouge_l(predictions: list[str], references: list[str], normalize: bool = False) -> float:
    """Mean ROUGE-L F1 (Lin, 2004) over prediction/reference pairs, on white-space tokens.

    Per pair, with `lcs` the length of the longest common token subsequence: precision `lcs / len(prediction)`,
    recall `lcs / len(reference)`, F1 their harmonic mean; 0.0 when either side has no tokens (as `rouge_score`).
    Tokens are compared as they are (case-sensitive) unless `normalize=True`, which first applies
    `normalize_answer` (lower case, no punctuation, no articles). No stemming. 0.0 for no pairs.
    """
    _check_pairs(predictions, references)
    if not predictions:
        return 0.0
    clean = normalize_answer if normalize else (lambda text: text)
    total = 0.0
    for prediction, reference in zip(predictions, references):
        predicted, target = clean(prediction).split(), clean(reference).split()
        common = _lcs_length(predicted, target) if predicted and target else 0
        if common:
            precision, recall = common / len(predicted), common / len(target)
            total += 2 * precision * recall / (precision + recall)
    return total / len(predictions)


__all__ = ["accuracy", "continual_metrics", "exact_match", "normalize_answer", "rouge_l"]
