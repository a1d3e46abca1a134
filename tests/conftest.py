"""Shared test set-up. Offline by construction: the Hugging Face hub is told so at import time, so a missing
pretrained checkpoint fails at once instead of waiting on the network."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: a second thread costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
