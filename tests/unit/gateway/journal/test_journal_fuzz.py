"""Random damage: nothing but JournalError ever escapes, and repair keeps every intact record."""

from __future__ import annotations

import contextlib
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from journal_helpers import payload

from mell.common.errors import JournalError
from mell.gateway.journal import Journal, JournalConfig, check, read_records, repair, replay
from mell.gateway.journal.format import Frame, list_segments, segment_name
from mell.gateway.journal.repair import _scan

CONFIG = JournalConfig(segment_bytes=4096, fsync="never", retain_segments=10)
SEEDS = range(120)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pristine")
    with Journal.open(d, CONFIG) as journal:
        for i in range(150):
            journal.append(payload(i))
        journal.write_snapshot(b"snapshot")
        for i in range(150, 260):
            journal.append(payload(i))
    (d / "LOCK").unlink()
    return d


def _damage(rng: random.Random, d: Path) -> str:
    segments = list_segments(d)
    seg = rng.choice(segments)
    data = bytearray(seg.read_bytes())
    what = rng.choice(["flip", "truncate", "insert", "zero", "delete", "append", "random", "dup"])
    if what == "flip":
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif what == "truncate":
        del data[rng.randrange(len(data)) :]
    elif what == "insert":
        pos = rng.randrange(len(data))
        data[pos:pos] = rng.randbytes(rng.randint(1, 64))
    elif what == "zero":
        pos = rng.randrange(len(data))
        data[pos : pos + rng.randint(1, 300)] = bytes(min(300, len(data) - pos))
    elif what == "delete":
        seg.unlink()
        return what
    elif what == "append":
        data += rng.randbytes(rng.randint(1, 100))
    elif what == "random":
        data = bytearray(rng.randbytes(rng.randint(0, 200)))
    elif what == "dup":  # a copy of a segment under a later name: out-of-order records
        (d / segment_name(10**6)).write_bytes(bytes(data))
        return what
    seg.write_bytes(bytes(data))
    return what


def _must_be_journal_error(func: Callable[[], object]) -> None:
    with contextlib.suppress(JournalError):  # anything else fails the test
        func()


def _intact(d: Path) -> set[tuple[int, bytes]]:
    out = set()
    for path in list_segments(d):
        out |= {(f.seq, f.payload) for f in _scan(path).frames if isinstance(f, Frame)}
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_random_damage(pristine: Path, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    d = tmp_path / "j"
    shutil.copytree(pristine, d)
    for _ in range(rng.randint(1, 3)):
        _damage(rng, d)

    _must_be_journal_error(lambda: list(replay(d)))
    _must_be_journal_error(lambda: list(read_records(d)))
    _must_be_journal_error(lambda: Journal.open(d, CONFIG).close())
    before = check(d)  # never raises on damaged content
    intact = _intact(d)

    result = repair(d)
    assert result.after is not None and result.after.ok, result.after.problems
    dropped = {seq for _, _, seq in result.dropped_records}
    after = {(r.seq, r.payload) for r in read_records(d, include_lost=True) if r.kind != "lost"}
    missing = {(s, p) for s, p in intact if s not in dropped} - after
    assert not missing, f"repair lost intact records {sorted(s for s, _ in missing)}"
    if before.ok and not any(p.kind == "torn-tail" for p in before.problems):
        assert not result.changed
    list(replay(d))  # replays cleanly now
    with Journal.open(d, CONFIG) as journal:
        journal.append(b"after repair")
    assert check(d).ok
