"""The `evaluate` metric modules shipped in pmoe/evaluate_modules, loaded by path and offline."""

import os

# Read when `evaluate` / `datasets` are first imported (conftest already sets HF_HUB_OFFLINE); the fixture below also
# patches the loaded config modules and refuses every socket connection, in case they were imported earlier.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")

import socket
from pathlib import Path

import pytest

import pmoe
from pmoe import metrics


import evaluate  # noqa: E402  (a test extra: a missing one must fail, not skip)

NAMES = ["accuracy", "continual_learning", "exact_match", "rouge_l"]

# A hand-worked 3 x 3 accuracy matrix: MATRIX[i][j] = score on task j after training tasks 0..i.
MATRIX = [
    [0.8, 0.3, 0.1],
    [0.85, 0.9, 0.4],  # task 0 still improves after task 1: forgetting must use the max, BWT the diagonal
    [0.7, 0.5, 1.0],
]
BASELINE = [0.2, 0.1, 0.3]
EXPECTED = {
    "num_tasks": 3,
    "LA": (0.8 + 0.9 + 1.0) / 3,  # 0.9
    "OP": (0.7 + 0.5 + 1.0) / 3,  # 0.7333...
    "BWT": ((0.7 - 0.8) + (0.5 - 0.9)) / 2,  # (-0.1 - 0.4) / 2 = -0.25
    "FWT": ((0.3 - 0.1) + (0.4 - 0.3)) / 2,  # (MATRIX[0][1] - BASELINE[1] + MATRIX[1][2] - BASELINE[2]) / 2 = 0.15
    # task 0: max(0.8, 0.85) - 0.7 = 0.15; task 1: max(0.9) - 0.5 = 0.4; the last task has no forgetting.
    "forgetting": [0.15, 0.4],
}


@pytest.fixture(scope="module")
def no_network():
    """Offline flags on, and any socket connection fails the test (recorded, as libraries may swallow the error)."""
    import datasets
    import huggingface_hub

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        patch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
        patch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield attempts
    assert attempts == [], f"the evaluate modules tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate_cache")


@pytest.fixture(scope="module")
def load(no_network, cache_dir):
    """`load(name)`: a fresh instance of a shipped module, its prediction cache in a temporary directory."""

    def _load(name):
        module = evaluate.load(pmoe.evaluate_module_path(name), cache_dir=str(cache_dir))
        assert no_network == []
        return module

    return _load


def leftover_caches(cache_dir):
    """Prediction files `evaluate` did not delete (it deletes them when `_compute` returns)."""
    return sorted(path.name for path in cache_dir.rglob("*.arrow"))


def test_module_paths_ship_a_script_and_a_card():
    for name in NAMES:
        directory = Path(pmoe.evaluate_module_path(name))
        assert directory.is_absolute() and directory.name == name
        assert (directory / f"{name}.py").is_file() and (directory / "README.md").is_file()
        assert not (directory / "__init__.py").exists()
        # The math is pmoe.metrics', not a copy.
        assert "from pmoe.metrics import" in (directory / f"{name}.py").read_text()
    with pytest.raises(ValueError, match="available: accuracy, continual_learning, exact_match, rouge_l"):
        pmoe.evaluate_module_path("bleu")


def test_continual_learning_whole_matrix(load):
    module = load("continual_learning")
    assert isinstance(module, evaluate.Metric)
    assert "one row of the matrix" in module.info.description.lower()
    result = module.compute(accuracies=MATRIX, baseline=BASELINE)
    assert set(result) == set(EXPECTED)
    assert result["num_tasks"] == 3
    for key in ("LA", "OP", "BWT", "FWT"):
        assert result[key] == pytest.approx(EXPECTED[key]), key
    assert result["forgetting"] == pytest.approx(EXPECTED["forgetting"])
    assert result == metrics.continual_metrics(MATRIX, BASELINE)

    without_baseline = module.compute(accuracies=MATRIX)
    assert "FWT" not in without_baseline
    assert without_baseline["BWT"] == pytest.approx(EXPECTED["BWT"])


def test_continual_learning_row_by_row(load):
    module = load("continual_learning")
    for row in MATRIX:  # one row after training each task
        module.add(accuracies=row)
    assert module.compute(baseline=BASELINE) == module.compute(accuracies=MATRIX, baseline=BASELINE)

    module.add_batch(accuracies=MATRIX[:2])
    module.add(accuracies=MATRIX[2])
    assert module.compute(baseline=BASELINE)["FWT"] == pytest.approx(EXPECTED["FWT"])


def test_continual_learning_exact_values_and_one_task(load):
    module = load("continual_learning")
    # Binary fractions: exact equality. LA = (1 + .75) / 2, OP = (.5 + .75) / 2, BWT = .5 - 1, FWT = .25 - 0.
    assert module.compute(accuracies=[[1.0, 0.25], [0.5, 0.75]], baseline=[0.0, 0.0]) == {
        "num_tasks": 2,
        "LA": 0.875,
        "OP": 0.625,
        "BWT": -0.5,
        "forgetting": [0.5],
        "FWT": 0.25,
    }
    assert module.compute(accuracies=[[0.5]], baseline=[0.25]) == {
        "num_tasks": 1,
        "LA": 0.5,
        "OP": 0.5,
        "BWT": 0.0,
        "forgetting": [],
        "FWT": 0.0,
    }


def test_continual_learning_errors(load, cache_dir):
    module = load("continual_learning")
    with pytest.raises(ValueError, match=r"must be square .*lengths \[2, 2, 2\]"):
        module.compute(accuracies=[[1.0, 0.0], [0.5, 1.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"must be square .*lengths \[2, 3\]"):
        module.compute(accuracies=[[1.0, 0.0], [0.5, 1.0, 0.0]])
    with pytest.raises(ValueError, match="baseline has 2 scores for 3 tasks"):
        module.compute(accuracies=MATRIX, baseline=[0.0, 0.0])
    # The errors are raised after evaluate's cleanup: no cache file left behind, and the instance is still usable
    # (without that, the next compute would wait a second for the stale lock).
    assert leftover_caches(cache_dir) == []
    assert module.compute(accuracies=MATRIX)["LA"] == pytest.approx(EXPECTED["LA"])
    for row in MATRIX[:2]:
        module.add(accuracies=row)
    with pytest.raises(ValueError, match=r"must be square .*lengths \[3, 3\]"):
        module.compute(baseline=BASELINE)
    assert leftover_caches(cache_dir) == []


def test_exact_match(load):
    module = load("exact_match")
    predictions = ["The Cat!", "  dog ", "Paris", "a bird"]
    references = ["cat", "dog", "paris", "bird"]
    # Normalised: case, punctuation and articles go -> all four match.
    assert module.compute(predictions=predictions, references=references) == {"exact_match": 1.0}
    # Stripped only: "dog" and nothing else.
    assert module.compute(predictions=predictions, references=references, normalize=False) == {"exact_match": 0.25}
    assert module.compute(predictions=["yes", "no"], references=["yes", "yes"]) == {"exact_match": 0.5}


def test_accuracy(load, cache_dir):
    module = load("accuracy")
    assert module.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1]) == {"accuracy": 0.5}
    assert module.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1], normalize=False) == {"accuracy": 2.0}
    # Weighted: correct weights 3 + 1 out of 3 + 1 + 2 + 2.
    weighted = module.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1], sample_weight=[3, 1, 2, 2])
    assert weighted == {"accuracy": 0.5}
    weighted = module.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1], sample_weight=[3, 1, 1, 1])
    assert weighted == {"accuracy": pytest.approx(4 / 6)}
    with pytest.raises(ValueError, match="3 sample weights for 2 predictions"):
        module.compute(predictions=[1, 0], references=[1, 1], sample_weight=[1, 1, 1])
    assert leftover_caches(cache_dir) == []
    assert module.compute(predictions=[1, 0], references=[1, 1]) == {"accuracy": 0.5}
    assert metrics.accuracy([], []) == 0.0


def test_rouge_l(load):
    module = load("rouge_l")
    assert module.compute(predictions=["the cat sat"], references=["the cat sat"]) == {"rougeL": 1.0}
    assert module.compute(predictions=["the cat sat"], references=["a dog ran"]) == {"rougeL": 0.0}
    # LCS("a b c d", "a c e") = "a c" = 2: P = 2/4, R = 2/3, F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7.
    assert module.compute(predictions=["a b c d"], references=["a c e"])["rougeL"] == pytest.approx(4 / 7)
    # A subsequence, not a substring: LCS("a x b y c", "a b c") = 3, P = 3/5, R = 1, F1 = 1.2 / 1.6 = 0.75.
    assert module.compute(predictions=["a x b y c"], references=["a b c"])["rougeL"] == pytest.approx(0.75)
    # The mean over pairs: (1 + 0 + 4/7) / 3; an empty text scores 0.
    result = module.compute(predictions=["x y", "p", "a b c d", ""], references=["x y", "q", "a c e", "a"])
    assert result["rougeL"] == pytest.approx((1 + 0 + 4 / 7 + 0) / 4)
    # Case-sensitive unless normalised (lower case, punctuation and articles dropped).
    assert module.compute(predictions=["The Cat."], references=["the cat"])["rougeL"] == 0.0
    assert module.compute(predictions=["The Cat."], references=["the cat"], normalize=True)["rougeL"] == 1.0


def test_metric_functions_check_lengths():
    for function in (metrics.accuracy, metrics.exact_match, metrics.rouge_l):
        with pytest.raises(ValueError, match="2 predictions for 1 references"):
            function(["a", "b"], ["a"])
    assert metrics.rouge_l([], []) == 0.0
    assert metrics._lcs_length("a b a c".split(), "b a c a".split()) == 3
