"""Group commit: a record acknowledged as durable survives kill -9 of the writing process.

(kill -9 keeps the page cache, so this checks the acknowledgement protocol and crash recovery
of the files, not the disk's fsync; a power cut cannot be staged in a unit test.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from journal_helpers import payload, payloads

from mell.gateway.journal import Journal, JournalConfig, check

WRITER = """
import sys
from mell.gateway.journal import Journal, JournalConfig
sys.path.insert(0, {helpers!r})
from journal_helpers import payload
journal = Journal.open({directory!r}, JournalConfig(fsync={policy!r}, fsync_interval_s=0.005,
                                                    segment_bytes=8192))
i = 0
while True:
    seq = journal.append(payload(i))
    i += 1
    if i % 200 == 0:
        journal.wait_durable(seq)
        print("DURABLE", seq, flush=True)
"""


@pytest.mark.parametrize(("policy", "target"), [("interval", 2000), ("always", 400)])
def test_acknowledged_records_survive_kill_9(tmp_path: Path, policy: str, target: int) -> None:
    directory = tmp_path / "j"
    code = WRITER.format(
        helpers=str(Path(__file__).parent), directory=str(directory), policy=policy
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    acknowledged = 0
    try:
        deadline = time.monotonic() + 30
        while acknowledged < target and time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith("DURABLE"), line
            acknowledged = int(line.split()[1])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()  # type: ignore[union-attr]
    assert acknowledged >= target

    with Journal.open(directory, JournalConfig()) as journal:  # recovers, truncating any tear
        recovered = journal.last_seq
    assert recovered >= acknowledged
    got = payloads(directory)
    assert got == [payload(i) for i in range(recovered)]
    report = check(directory)
    assert report.ok and not report.problems
