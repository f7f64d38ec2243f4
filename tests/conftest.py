"""Shared test configuration: GPU tests are skipped where CUDA is absent; per-user state
(`mellctl up`'s record of the running cluster) goes to a directory of this run, not ~."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_STATE_HOME = tempfile.mkdtemp(prefix="mell-test-state-")


def pytest_configure(config: pytest.Config) -> None:
    os.environ["XDG_STATE_HOME"] = _STATE_HOME  # children inherit it


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_STATE_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
