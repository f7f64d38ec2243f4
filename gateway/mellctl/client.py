"""The admin API client of `mellctl`: where the gateway is, its token, and HTTP (stdlib only).

Where (first found wins):
  URL:   --url, $MELL_ADMIN_URL, `url` in the config file, DATA_DIR/admin.json (left by the gateway)
  token: --token, $MELL_ADMIN_TOKEN, `token` or `token_file` in the config file,
         DATA_DIR/admin.token (created by the gateway at first start)
  DATA_DIR: --data-dir, `data_dir` in the config file, ./.mell if it exists, the data dir of a
            running `mellctl up` (see `running.py`), /var/lib/mell.
The config file is $MELLCTL_CONFIG or ~/.config/mell/mellctl.toml (XDG_CONFIG_HOME honoured),
a TOML table with any of url, token, token_file, data_dir.

Errors: `Unreachable` (exit 3) when no gateway answers or none can be found; `ServerError`
(exit 1) when the gateway answers with an error; both carry a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mell.common.errors import MellError
from mell.gateway.admin.token import TOKEN_FILE, read_token, read_url
from mell.gateway.mellctl.running import running_data_dir

PREFIX = "/admin/v1"
LOCAL_DATA_DIR = ".mell"  # `mellctl up`'s default, relative to where it ran
SYSTEM_DATA_DIR = "/var/lib/mell"  # the systemd units'


class Unreachable(MellError):
    """No gateway admin API could be found or reached (exit code 3)."""


class ServerError(MellError):
    """The gateway answered with an error (exit code 1)."""


def add_target_args(parser: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    """--url, --token, --data-dir (and --json for read commands)."""
    g = parser.add_argument_group("gateway")
    g.add_argument("--url", help="admin API URL (default: from the config file or data dir)")
    g.add_argument("--token", help="admin token (default: DATA_DIR/admin.token)")
    g.add_argument("--data-dir", help="the gateway's data directory (.mell, /var/lib/mell)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def config_path() -> Path:
    if explicit := os.environ.get("MELLCTL_CONFIG"):
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "mell" / "mellctl.toml"


def _config_file() -> dict[str, Any]:
    path = config_path()
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise MellError(f"{path}: {err}") from None


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    token: str


def resolve(args: argparse.Namespace) -> Target:
    """Find the admin URL and token from flags, environment, config file and data dir."""
    conf = _config_file()
    data_dir = _data_dir(args.data_dir or conf.get("data_dir"))
    url = args.url or os.environ.get("MELL_ADMIN_URL") or conf.get("url")
    if not url and data_dir is not None:
        url = read_url(data_dir)
    if not url:
        raise Unreachable(
            "cannot find the gateway's admin API: pass --url or --data-dir "
            f"(or set url in {config_path()})"
        )
    token = args.token or os.environ.get("MELL_ADMIN_TOKEN") or conf.get("token")
    if not token:
        token_file = conf.get("token_file") or (
            str(Path(data_dir) / TOKEN_FILE) if data_dir is not None else None
        )
        token = _read_token_file(token_file)
    return Target(url.rstrip("/"), token)


def _data_dir(given: str | None) -> Path | None:
    if given:
        return Path(given).expanduser()
    for candidate in (Path(LOCAL_DATA_DIR), running_data_dir(), Path(SYSTEM_DATA_DIR)):
        if candidate is not None and (candidate / TOKEN_FILE).exists():
            return candidate
    return None


def _read_token_file(path: str | None) -> str:
    if path is None:
        raise MellError("no admin token: pass --token or --data-dir")
    try:
        return read_token(path)
    except (OSError, ValueError) as err:
        raise MellError(f"cannot read the admin token: {err}") from None


class AdminClient:
    """GET/POST JSON and JSON-lines streams against the admin API."""

    def __init__(self, target: Target, timeout_s: float = 10.0) -> None:
        self.target = target
        self.timeout_s = timeout_s

    def get(self, path: str, **query: Any) -> Any:
        with self._open("GET", path, query) as response:
            return json.loads(response.read())

    def post(self, path: str) -> Any:
        with self._open("POST", path, {}) as response:
            return json.loads(response.read())

    def lines(self, path: str, timeout_s: float | None = None, **query: Any) -> Iterator[Any]:
        """The JSON objects of a JSON-lines response, as they arrive (blank lines skipped)."""
        with self._open("GET", path, query, timeout_s) as response:
            for raw in response:
                if raw.strip():
                    yield json.loads(raw)

    def _open(
        self, method: str, path: str, query: dict[str, Any], timeout_s: float | None = None
    ) -> Any:
        params = {k: v for k, v in query.items() if v is not None and v is not False}
        url = f"{self.target.url}{PREFIX}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        request = urllib.request.Request(
            url,
            method=method,
            data=b"" if method == "POST" else None,
            headers={"Authorization": f"Bearer {self.target.token}"},
        )
        try:
            return urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s)
        except urllib.error.HTTPError as err:
            raise ServerError(f"{err.code}: {_error_message(err)}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise Unreachable(f"gateway admin API at {self.target.url}: {reason}") from None


def _error_message(err: urllib.error.HTTPError) -> str:
    try:
        return json.loads(err.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(err.reason)


def connect(args: argparse.Namespace) -> AdminClient:
    return AdminClient(resolve(args))
