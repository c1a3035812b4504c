"""Test-wide settings: offline Hugging Face, deterministic seeds, few threads (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread() -> None:
    """Run a test module on one torch thread: tiny models are fastest so, and on a busy 2-core machine idle OpenMP
    threads spin (generation tests ran 5-40x slower with two). Use with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
