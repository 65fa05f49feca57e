"""Shared fixtures. Nothing here reaches the network: models and tokenizers are built locally."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run every test with one torch thread, then restore the setting.

    The tiny models' matmuls take microseconds: on a shared 2-core machine, torch's default thread pool
    costs far more than it gains (tiny SFT steps measured ~25x slower with 2 threads under load).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
