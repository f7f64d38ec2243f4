"""Types of the optional C extension `_frame.c`: the twins of `appender.PyAppender` and of
`format.append_record_py` and `format.discard_prefix_py`, which have the same signatures."""

class Appender:
    _buf: bytearray  # the current buffer
    _next_seq: int
    _seg_room: int  # bytes the current segment may still take
    _limit: int  # past this len(_buf), `_slow_path`

    def append(self, payload: bytes) -> int: ...

def append_record(
    buf: bytearray,
    kind: int,
    seq: int,
    payload: bytes | bytearray | memoryview,
    timestamp: float | None = None,
) -> int: ...
def discard_prefix(buf: bytearray, n: int) -> None: ...
