"""The admin API's bearer token: created at first start in the data directory, mode 0600.

`mellctl` reads the same file (or is given the token). The admin listener also leaves its URL
in `admin.json` beside it, so that `mellctl` finds a gateway from its data directory alone.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

TOKEN_FILE = "admin.token"
URL_FILE = "admin.json"


def ensure_token(data_dir: Path | str) -> str:
    """The token in DATA_DIR/admin.token, creating it (0600, 256 random bits) if absent."""
    path = Path(data_dir) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return read_token(path)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def read_token(path: Path | str) -> str:
    """The token in a token file; ValueError when it is empty."""
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def write_url(data_dir: Path | str, url: str) -> None:
    """Record where the admin API listens (replaced atomically)."""
    path = Path(data_dir) / URL_FILE
    tmp = path.with_name(f".{URL_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    os.replace(tmp, path)


def read_url(data_dir: Path | str) -> str | None:
    try:
        return json.loads((Path(data_dir) / URL_FILE).read_text())["url"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
