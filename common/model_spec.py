"""What `--model` means: a checkpoint directory, or "mell-tiny" created in the data directory.

The gateway and the workers resolve the same spec the same way, so they agree on the served
model name without talking: the name of "mell-tiny" is "mell-tiny", a directory's is its base
name. Both read a checkpoint's JSON files (`config.json`, `generation_config.json`) with
`read_checkpoint_json`, so a broken file gets the same one-line error on either side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mell.common.errors import ConfigError, ModelError

TINY = "mell-tiny"


def model_name(spec: str) -> str:
    """The served model name (`model` in API requests) of a model spec."""
    if spec == TINY:
        return TINY
    return Path(spec).expanduser().resolve().name


def resolve_model_dir(spec: str, data_dir: str | Path) -> Path:
    """The checkpoint directory of `spec`, creating mell-tiny under `data_dir` on first use."""
    if spec == TINY:
        from mell.common.tiny_model import ensure_tiny_model

        return ensure_tiny_model(Path(data_dir).expanduser() / "models" / TINY)
    path = Path(spec).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {spec!r}: no config.json in {path}")
    return path


def read_checkpoint_json(path: Path) -> dict[str, Any] | None:
    """A checkpoint's JSON file as a dict, or None when it does not exist. ModelError naming
    the file when it cannot be read, is not UTF-8 JSON, or is not a JSON object."""
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ModelError(f"{path}: cannot read: {err.strerror}") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise ModelError(f"{path}: invalid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data
