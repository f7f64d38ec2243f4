"""The per-user record of the running `mellctl up`, so `mellctl` finds it from any directory.

`mellctl up` writes `$XDG_STATE_HOME/mell/up.json` (default `~/.local/state/mell/up.json`) once
its cluster is serving: the data directory and the pid of that `mellctl up`. It removes the file
when it stops, if the file is still its own. A record whose pid is gone is ignored, so a killed
`mellctl up` leaves nothing misleading behind. With several `mellctl up` at once, the record
names the last one started; `--data-dir` picks any other.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "mell" / "up.json"


def record(data_dir: Path) -> None:
    """Name `data_dir` as the running local cluster's (best effort: a read-only home is fine)."""
    path = record_path()
    body = json.dumps({"data_dir": str(data_dir), "pid": os.getpid()})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(body)
        tmp.replace(path)
    except OSError:
        pass


def forget() -> None:
    """Remove the record if this process wrote it."""
    path = record_path()
    if _read(path).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def running_data_dir() -> Path | None:
    """The data directory of a `mellctl up` that is still running, or None."""
    entry = _read(record_path())
    pid, data_dir = entry.get("pid"), entry.get("data_dir")
    if not isinstance(pid, int) or not isinstance(data_dir, str) or not _alive(pid):
        return None
    return Path(data_dir)


def _read(path: Path) -> dict[str, object]:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entry if isinstance(entry, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True
