"""The worker daemon's loop around an engine (the fake one): commands, batches, drain."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from pathlib import Path
from typing import Any

from mell.common.config import EngineConfig, WorkerConfig
from mell.common.messages import (
    AbortRequest,
    AddRequest,
    Drain,
    DrainCompleted,
    Hello,
    LoadReport,
    Ping,
    Reply,
    RequestFailed,
    Sleep,
    TokenBatch,
    Wake,
    Welcome,
)
from mell.common.sampling import SamplingParams
from mell.workerd.engine.fake_engine import FakeEngine
from mell.workerd.worker import Worker


class FakeLink:
    data_address = "tcp://127.0.0.1:1"

    def __init__(self) -> None:
        self.inbox: queue.Queue[Any] = queue.Queue()
        self.sent: list[Any] = []

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def sign(self, hello: Any) -> Any:
        return hello

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.sent if isinstance(m, kind)]


def make_worker(tmp_path: Path, rate: float = 1000.0) -> tuple[Worker, FakeLink]:
    (tmp_path / "config.json").write_text('{"vocab_size": 100, "max_position_embeddings": 64}')
    config = WorkerConfig(
        worker_id="w0",
        load_report_interval_s=0.01,
        drain_grace_s=2.0,
        engine=EngineConfig(model=str(tmp_path), num_kv_blocks=32),
    )
    link = FakeLink()
    link.inbox.put(Welcome(gateway_boot_id="g", epoch_s=0.1))
    return Worker(config, FakeEngine(config.engine, rate), link, "m"), link


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_generates_one_batch_per_step_and_drains_on_stop(tmp_path: Path) -> None:
    worker, link = make_worker(tmp_path)
    thread = run_in_thread(worker)
    for rid in ("a", "b"):
        link.inbox.put(AddRequest(rid, [1, 2, 3], SamplingParams(max_tokens=5)))
    wait_for(lambda: sum(len(b.outputs) for b in link.of(TokenBatch)) >= 10)
    worker.request_stop()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(link.sent[0], Hello)
    batches = link.of(TokenBatch)
    indices = {
        rid: [o.first_index for b in batches for o in b.outputs if o.request_id == rid]
        for rid in ("a", "b")
    }
    assert indices == {"a": [0, 1, 2, 3, 4], "b": [0, 1, 2, 3, 4]}
    assert any(len(b.outputs) == 2 for b in batches)  # both requests in one step's batch
    assert link.of(DrainCompleted) == [DrainCompleted(True)]
    assert link.of(LoadReport)


def test_per_request_error_abort_and_ping(tmp_path: Path) -> None:
    worker, link = make_worker(tmp_path, rate=50.0)
    thread = run_in_thread(worker)
    link.inbox.put(AddRequest("long", [1] * 60, SamplingParams(max_tokens=10)))
    link.inbox.put(AddRequest("ok", [1, 2], SamplingParams(max_tokens=50)))
    link.inbox.put(Ping(call_id=3))
    wait_for(lambda: link.of(TokenBatch) and link.of(Reply))
    link.inbox.put(AbortRequest(["ok"]))
    wait_for(lambda: not worker.engine.has_unfinished())
    failed = link.of(RequestFailed)
    assert [f.request_id for f in failed] == ["long"]
    assert "context length" in failed[0].message
    assert link.of(Reply) == [Reply(call_id=3)]
    link.inbox.put(Drain(call_id=4))
    link.inbox.put(AddRequest("late", [1], SamplingParams(max_tokens=2)))
    wait_for(lambda: len(link.of(RequestFailed)) == 2)
    assert link.of(RequestFailed)[1].code == "ServiceUnavailableError"
    worker.request_stop()
    thread.join(5)
    assert not thread.is_alive()


def test_grace_period_aborts_what_is_left(tmp_path: Path) -> None:
    worker, link = make_worker(tmp_path, rate=20.0)
    worker.config = worker.config.__class__(**{**_fields(worker.config), "drain_grace_s": 0.2})
    thread = run_in_thread(worker)
    link.inbox.put(AddRequest("slow", [1, 2], SamplingParams(max_tokens=60)))
    wait_for(lambda: link.of(TokenBatch))
    worker.request_stop()
    thread.join(5)
    assert [f.request_id for f in link.of(RequestFailed)] == ["slow"]
    assert link.of(DrainCompleted) == [DrainCompleted(True)]


def _fields(config: WorkerConfig) -> dict[str, Any]:
    return {f: getattr(config, f) for f in config.__struct_fields__}


def test_min_step_paces_the_steps_and_keeps_receiving(tmp_path: Path) -> None:
    worker, link = make_worker(tmp_path)
    worker.config = worker.config.__class__(**{**_fields(worker.config), "min_step_ms": 40.0})
    batches: list[float] = []
    pinged: list[float] = []
    replied: list[float] = []
    send = link.send

    def timed_send(message: Any) -> None:  # runs on the worker's thread
        send(message)
        if isinstance(message, TokenBatch):
            batches.append(time.monotonic())
            if len(batches) == 2:  # a message arriving as the paced wait begins
                pinged.append(time.monotonic())
                link.inbox.put(Ping(call_id=9))
        elif isinstance(message, Reply):
            replied.append(time.monotonic())

    link.send = timed_send  # type: ignore[method-assign]
    thread = run_in_thread(worker)
    link.inbox.put(AddRequest("a", [1, 2, 3], SamplingParams(max_tokens=6)))
    wait_for(lambda: not worker.engine.has_unfinished() and replied)
    worker.request_stop()
    thread.join(5)
    assert not thread.is_alive()
    gaps = [b - a for a, b in itertools.pairwise(batches)]
    assert len(gaps) >= 4 and min(gaps) >= 0.039  # at most one step per 40 ms
    assert replied[0] - pinged[0] < 0.02  # answered within the wait, not after it


def test_sleep_is_refused_while_busy_reported_at_once_and_a_request_wakes_it(
    tmp_path: Path,
) -> None:
    worker, link = make_worker(tmp_path, rate=50.0)
    thread = run_in_thread(worker)
    link.inbox.put(AddRequest("a", [1, 2], SamplingParams(max_tokens=20)))
    link.inbox.put(Sleep(call_id=5))
    wait_for(lambda: link.of(Reply))
    assert link.of(Reply)[0].call_id == 5
    assert "holds 1 requests" in (link.of(Reply)[0].error or "")
    assert not worker.engine.sleeping
    wait_for(lambda: not worker.engine.has_unfinished())
    link.inbox.put(Sleep(call_id=6))
    wait_for(lambda: len(link.of(Reply)) == 2)
    assert link.of(Reply)[1] == Reply(call_id=6)
    # The report that shows it asleep went out before the reply.
    before_reply = link.sent[: link.sent.index(link.of(Reply)[1])]
    assert [m for m in before_reply if isinstance(m, LoadReport)][-1].load.sleeping
    link.inbox.put(AddRequest("b", [1, 2], SamplingParams(max_tokens=3)))
    wait_for(lambda: any(o.request_id == "b" and o.finish_reason
                         for b in link.of(TokenBatch) for o in b.outputs))  # fmt: skip
    woke = next(i for i, m in enumerate(link.sent) if isinstance(m, TokenBatch)
                and any(o.request_id == "b" for o in m.outputs))  # fmt: skip
    reports = [m for m in link.sent[:woke] if isinstance(m, LoadReport)]
    assert not reports[-1].load.sleeping  # reported awake before its first token
    link.inbox.put(Sleep(call_id=7))
    link.inbox.put(Wake(call_id=8))
    wait_for(lambda: len(link.of(Reply)) == 4)
    assert link.of(Reply)[2:] == [Reply(call_id=7), Reply(call_id=8)]
    assert not worker.engine.sleeping
    worker.request_stop()
    thread.join(5)
    assert not thread.is_alive()
