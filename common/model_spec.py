"""What `--model` means: a checkpoint directory, or "mell-tiny" created in the data directory.

The gateway and the workers resolve the same spec the same way, so they agree on the served
model name without talking: the name of "mell-tiny" is "mell-tiny", a directory's is its base
name.
"""

from __future__ import annotations

from pathlib import Path

from mell.common.errors import ConfigError

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
