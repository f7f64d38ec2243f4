"""The C framing extension and its pure-Python twins write the same bytes, and so do the writers
built on either (the extension is optional: without it the writer runs the Python path)."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from journal_helpers import payload, payloads

from mell.gateway.journal import Journal, JournalConfig
from mell.gateway.journal.appender import PyAppender
from mell.gateway.journal.format import (
    SEGMENT_HEADER,
    Frame,
    append_record_py,
    discard_prefix_py,
    encode_record,
    iter_frames,
    list_segments,
)
from mell.gateway.journal.writer import CHUNK_BYTES

try:
    from mell.gateway.journal import _frame
except ImportError:
    _frame = None

needs_c = pytest.mark.skipif(_frame is None, reason="the C extension _frame was not built")


@needs_c
@settings(max_examples=300, deadline=None)
@given(
    kind=st.integers(0, 127),
    seq=st.integers(0, 2**64 - 1),
    ts=st.floats(allow_nan=True, allow_infinity=True),
    data=st.binary(max_size=2000),
    prefix=st.binary(max_size=40),
)
def test_c_and_python_framing_write_the_same_bytes(
    kind: int, seq: int, ts: float, data: bytes, prefix: bytes
) -> None:
    c_buf, py_buf = bytearray(prefix), bytearray(prefix)
    assert _frame.append_record(c_buf, kind, seq, data, ts) == len(c_buf)
    assert append_record_py(py_buf, kind, seq, data, ts) == len(py_buf)
    assert c_buf == py_buf == prefix + encode_record(kind, seq, ts, data)


@needs_c
def test_crc_is_zlib_crc32_at_every_length() -> None:
    rng = random.Random(1)
    for n in range(0, 700):  # bodies of 25..724 bytes: the table and the folding paths
        data = rng.randbytes(n)
        buf = bytearray()
        _frame.append_record(buf, 1, n, data, 0.5)
        (crc,) = struct.unpack_from("<I", buf, 8)
        assert crc == zlib.crc32(bytes(buf[12:])), n


@pytest.mark.parametrize("frame", [append_record_py, getattr(_frame, "append_record", None)])
def test_timestamp_defaults_to_the_wall_clock(frame) -> None:  # type: ignore[no-untyped-def]
    if frame is None:
        pytest.skip("the C extension _frame was not built")
    before = time.time()
    buf = bytearray()
    frame(buf, 1, 1, b"x")
    after = time.time()
    (ts,) = struct.unpack_from(">d", buf, 12 + 12)
    assert before <= ts <= after


@needs_c
def test_bad_input_is_refused_and_leaves_the_buffer_alone() -> None:
    buf = bytearray(b"keep")
    with pytest.raises(TypeError):
        _frame.append_record(b"bytes", 1, 1, b"x")
    with pytest.raises(ValueError, match="kind"):
        _frame.append_record(buf, 128, 1, b"x")
    with pytest.raises(OverflowError):
        _frame.append_record(buf, 1, -1, b"x")
    with pytest.raises(TypeError):
        _frame.append_record(buf, 1, 1, "text")
    with memoryview(buf) as view, pytest.raises(BufferError):
        _frame.append_record(buf, 1, 1, view)  # growing an exported bytearray
    assert buf == b"keep"


@pytest.mark.parametrize("discard", [discard_prefix_py, getattr(_frame, "discard_prefix", None)])
def test_discard_prefix(discard) -> None:  # type: ignore[no-untyped-def]
    if discard is None:
        pytest.skip("the C extension _frame was not built")
    buf = bytearray(b"0123456789")
    discard(buf, 3)
    assert buf == b"3456789"
    buf += b"ab"
    discard(buf, 0)
    assert buf == b"3456789ab"
    discard(buf, len(buf))
    assert buf == b""
    buf += b"again"  # refilled after emptying
    assert buf == b"again"
    with memoryview(buf), pytest.raises(BufferError):
        discard(buf, 1)
    assert buf == b"again"


@needs_c
def test_discard_prefix_refuses_a_bad_count() -> None:
    buf = bytearray(b"abc")
    for n in (-1, 4):
        with pytest.raises(ValueError):
            _frame.discard_prefix(buf, n)
    assert buf == b"abc"


def _frames_and_bytes(directory: Path) -> list[tuple[str, Frame, bytes]]:
    out = []
    for path in list_segments(directory):
        data = path.read_bytes()
        for item in iter_frames(data, SEGMENT_HEADER.size):
            assert isinstance(item, Frame), item
            out.append((path.name, item, data[item.offset : item.end]))
    return out


def _write_mixed(directory: Path) -> None:
    """Events of many sizes, rotations (small segments) and snapshots (all segments kept)."""
    config = JournalConfig(segment_bytes=4096, fsync_interval_s=0.005, retain_segments=10_000)
    with Journal.open(directory, config) as journal:
        for i in range(600):
            journal.append(payload(i) * (1 + i % 13))
            if i % 150 == 149:
                journal.write_snapshot(b"snapshot-%d" % i)


def test_written_records_are_the_reference_framing(tmp_path: Path) -> None:
    _write_mixed(tmp_path)
    found = _frames_and_bytes(tmp_path)
    assert len(found) == 604
    for _, frame, raw in found:
        assert raw == encode_record(frame.kind, frame.seq, frame.timestamp, frame.payload)


def test_the_pure_python_writer_writes_the_same_records(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['mell.gateway.journal._frame'] = None  # as if it was not built\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from mell.gateway.journal import appender, writer\n"
        "assert writer.Journal.append is appender.PyAppender.append\n"
        "from test_journal_frame import _write_mixed\n"
        "from pathlib import Path\n"
        f"_write_mixed(Path({str(tmp_path / 'py')!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    _write_mixed(tmp_path / "here")
    py, here = _frames_and_bytes(tmp_path / "py"), _frames_and_bytes(tmp_path / "here")
    assert len(py) == len(here) == 604
    for (py_seg, py_frame, py_raw), (seg, frame, raw) in zip(py, here, strict=True):
        assert (py_seg, py_frame.offset, py_frame.kind, py_frame.seq, py_frame.payload) == (
            seg,
            frame.offset,
            frame.kind,
            frame.seq,
            frame.payload,
        )
        assert py_raw == encode_record(frame.kind, frame.seq, py_frame.timestamp, frame.payload)
        assert raw == encode_record(frame.kind, frame.seq, frame.timestamp, frame.payload)
    if _frame is not None:
        assert Journal.append is not PyAppender.append  # this process used the C path


def test_sealed_buffers_are_written_before_the_commit_and_refilled(tmp_path: Path) -> None:
    # A long interval: what reaches the file before close came from the write-behind of
    # sealed buffers, which the producer then refills.
    config = JournalConfig(fsync_interval_s=30.0)
    data = [payload(i) * 20 for i in range(4 * CHUNK_BYTES // 200)]
    with Journal.open(tmp_path, config) as journal:
        for d in data:
            journal.append(d)
        segment = list_segments(tmp_path)[0]
        deadline = time.monotonic() + 10
        while segment.stat().st_size < CHUNK_BYTES and time.monotonic() < deadline:
            time.sleep(0.01)
        assert segment.stat().st_size >= CHUNK_BYTES
        assert journal.durable_seq == 0  # written, not yet committed
        more = [payload(i) for i in range(5000)]
        for d in more:
            journal.append(d)
    assert payloads(tmp_path) == data + more
