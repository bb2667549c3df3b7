"""The test processes' environment (offline) and the shared fixture; builders and helpers are in `helpers.py`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # always: no test may reach the real Hub (subprocesses set their own)
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest

from helpers import make_pmoe


@pytest.fixture
def tiny_model():
    return make_pmoe()
