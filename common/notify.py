"""systemd readiness and watchdog notifications (sd_notify(3) datagram protocol, by hand).

Does nothing when NOTIFY_SOCKET is unset, so daemons call it unconditionally. A leading "@" in
the socket path means the Linux abstract namespace.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    """Sends READY/WATCHDOG/STOPPING/STATUS to systemd; pings the watchdog at half its period."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        usec = int(env.get("WATCHDOG_USEC", "0") or 0)
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            usec = 0  # the watchdog is meant for another process
        self.watchdog_interval_s = usec / 2e6 if usec else 0.0
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self, now: float | None = None) -> None:
        """Ping the watchdog if half its interval has passed; call it from the liveness loop."""
        if not self.watchdog_interval_s:
            return
        now = time.monotonic() if now is None else now
        if now - self._last_ping >= self.watchdog_interval_s:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def send(self, message: str) -> bool:
        """Send one datagram; False (never an exception) when it cannot be delivered."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message.encode())
            return True
        except OSError:
            return False


def _address(path: str) -> str | None:
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    return path
