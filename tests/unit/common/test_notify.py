"""sd_notify by hand: datagrams reach a listener at NOTIFY_SOCKET; nothing when unset."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mell.common.notify import Notifier


def _listener(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    return sock


def test_ready_watchdog_stopping_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with _listener(path) as sock:
        env = {
            "NOTIFY_SOCKET": str(path),
            "WATCHDOG_USEC": "2000000",
            "WATCHDOG_PID": str(os.getpid()),
        }
        notifier = Notifier(env)
        notifier.ready("serving")
        assert sock.recv(256) == b"READY=1\nSTATUS=serving"
        notifier.watchdog(now=100.0)
        assert sock.recv(256) == b"WATCHDOG=1"
        notifier.watchdog(now=100.5)  # within half the interval: no ping
        notifier.stopping()
        assert sock.recv(256) == b"STOPPING=1"


def test_abstract_socket_name() -> None:
    name = f"mell-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(64) == b"READY=1"


def test_disabled_without_socket() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False
    notifier.watchdog()
