"""Stop strings: text is held back while it could still be the start of a stop string, so a
stop string is never partially emitted, and the output ends right before the first match (or
right after it, with `include`: vLLM's include_stop_str_in_output)."""

from __future__ import annotations


class StopMatcher:
    """Feeds generated text through; reports the first stop string found."""

    __slots__ = ("_held", "_hold", "_include", "_stops", "stopped")

    def __init__(self, stops: list[str], include: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._include = include
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The text safe to emit now; sets `stopped` when a stop string was completed."""
        if self.stopped:
            return ""
        buffer = self._held + text
        match = _first_match(buffer, self._stops)
        if match is not None:
            self.stopped = True
            self._held = ""
            at, stop = match
            return buffer[: at + len(stop)] if self._include else buffer[:at]
        keep = _longest_partial(buffer, self._stops, self._hold)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: the held-back text (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _first_match(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Where the earliest stop string starts, and which one."""
    best: tuple[int, str] | None = None
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop)
    return best


def _longest_partial(text: str, stops: list[str], limit: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    for n in range(min(limit, len(text)), 0, -1):
        tail = text[-n:]
        if any(stop.startswith(tail) for stop in stops):
            return n
    return 0
