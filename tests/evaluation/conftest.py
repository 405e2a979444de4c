"""Fixtures of the evaluation tests: tiny tensors, so one intra-op thread (the training tests' fixture)."""

from ..training.conftest import single_thread  # noqa: F401
