"""Continual-learning metrics from an accuracy matrix, and the per-task metrics the examples use.

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
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        return 0.0
    clean = normalize_answer if normalize else (lambda text: text.strip())
    return sum(clean(p) == clean(r) for p, r in zip(predictions, references)) / len(predictions)


__all__ = ["continual_metrics", "exact_match", "normalize_answer"]
