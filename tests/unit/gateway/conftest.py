"""Fixtures of the gateway unit tests: the tiny model's tokenizer, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from mell.common.tiny_model import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "mell-tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
