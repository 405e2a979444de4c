"""Fixtures of the training tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP spin-waiting against the rest of the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
