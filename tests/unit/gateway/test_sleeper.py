"""Which idle workers a pool can do without (`policy/sleep.py`) and the sleeper's clock
(`cluster/sleeper.py`), on views folded from events; the view shows a sleeping worker from
its journaled load report and lists it last to the policies."""

from __future__ import annotations

from typing import Any

from mell.common import events as ev
from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad
from mell.gateway.cluster.sleeper import Sleeper
from mell.gateway.cluster.view import ClusterView
from mell.gateway.policy.base import WorkerInfo, WorkerStatus
from mell.gateway.policy.sleep import not_needed


def joined(wid: str, sleep_after_s: float = 1.0) -> ev.WorkerJoined:
    identity = WorkerIdentity(worker_id=wid, boot_id="b-" + wid, model="m", capacity_blocks=100,
                              block_size=16, max_model_len=256, data_address="",
                              sleep_after_s=sleep_after_s)  # fmt: skip
    return ev.WorkerJoined(identity=identity)


def load(wid: str, used: int = 0, sleeping: bool = False) -> ev.LoadReported:
    requests = [RequestLoad(f"r-{wid}", used, used * 16)] if used else []
    return ev.LoadReported(
        worker_id=wid,
        load=WorkerLoad(num_running=len(requests), num_waiting=0, num_total_blocks=100,
                        num_free_blocks=100 - used, num_preemptions_total=0, requests=requests,
                        sleeping=sleeping, kv_bytes_released=1000 if sleeping else 0),
    )  # fmt: skip


def fold(events: list[Any]) -> ClusterView:
    view = ClusterView(["m"])
    for seq, event in enumerate(events, 1):
        view.apply(ev.EventEnvelope("test", seq, float(seq), event))
    return view


def pool(*workers: tuple[str, float]) -> list[Any]:
    out: list[Any] = []
    for wid, _ in workers:
        out += [joined(wid), ev.WorkerActivated(worker_id=wid)]
    return out


def info(wid: str, used: int = 0, sleeping: bool = False, status: int = 1) -> WorkerInfo:
    return WorkerInfo(worker_id=wid, model="m", status=WorkerStatus(status), capacity_blocks=100,
                      block_size=16, request_blocks={"r": used} if used else {},
                      num_free_blocks=100 - used, sleeping=sleeping)  # fmt: skip


def test_a_worker_is_not_needed_when_the_other_awake_workers_have_room() -> None:
    assert not_needed([info("a"), info("b", used=50)], "a")
    assert not not_needed([info("a"), info("b", used=80)], "a")  # the others are 80% full
    assert not not_needed([info("a")], "a")  # the pool's last worker
    assert not not_needed([info("a"), info("b", sleeping=True)], "a")  # its last awake one
    assert not not_needed([info("a"), info("b", status=2)], "a")  # the other is draining
    assert not not_needed([info("a", used=1), info("b")], "a")  # holds a request
    assert not not_needed([info("a", sleeping=True), info("b")], "a")  # asleep already
    assert not not_needed([info("b")], "a")  # unknown


def test_the_view_shows_a_sleeping_worker_and_lists_it_last() -> None:
    view = fold([*pool(("a", 1), ("b", 1)), load("a", sleeping=True), load("b")])
    a = view.worker_rows["a"]
    assert a.sleeping and a.kv_bytes_released == 1000 and a.releasable
    assert [w.worker_id for w in view.workers("m")] == ["b", "a"]
    assert view.workers("m")[1].sleeping
    view = fold([*pool(("a", 1), ("b", 1)), load("a", sleeping=True), load("a")])
    assert not view.worker_rows["a"].sleeping  # woke: its next report says so
    lost = fold([*pool(("a", 1),), load("a", sleeping=True), ev.WorkerLost(worker_id="a",
                 reason="x")])  # fmt: skip
    assert not lost.worker_rows["a"].sleeping


def test_the_sleeper_waits_for_the_idle_time_and_takes_one_worker_per_pool_at_a_time() -> None:
    view = fold([*pool(("a", 1), ("b", 1), ("c", 1)), load("a"), load("b"), load("c", used=10)])
    sleeper = Sleeper(view)
    assert sleeper.due(100.0) == []  # idle clocks start
    assert sleeper.due(100.9) == []
    assert sleeper.due(101.0) == ["a"]  # one per model per tick
    view.apply(ev.EventEnvelope("a", 10, 20.0, load("a", sleeping=True)))
    assert sleeper.due(101.1) == ["b"]  # c, 10% full, has room for the pool
    view.apply(ev.EventEnvelope("b", 11, 21.0, load("b", sleeping=True)))
    assert sleeper.due(102.0) == []  # c holds a request; a and b sleep
    sleeper.restart_clock("a", 102.0)  # (a refusal restarts a clock)


def test_a_busy_moment_restarts_the_idle_clock_and_zero_means_never() -> None:
    events = [joined("a"), ev.WorkerActivated(worker_id="a"), joined("b", sleep_after_s=0.0),
              ev.WorkerActivated(worker_id="b"), joined("c"), ev.WorkerActivated(worker_id="c"),
              load("a"), load("b"), load("c")]  # fmt: skip
    view = fold(events)
    sleeper = Sleeper(view)
    assert sleeper.due(0.0) == []
    view.apply(ev.EventEnvelope("a", 1, 50.0, load("a", used=5)))
    assert sleeper.due(0.5) == []
    view.apply(ev.EventEnvelope("a", 2, 51.0, load("a")))
    assert sleeper.due(1.0) == ["c"]  # idle since 0.0; b never sleeps (sleep_after_s 0)
    view.apply(ev.EventEnvelope("c", 1, 52.0, load("c", sleeping=True)))
    assert sleeper.due(1.9) == []  # a: idle again only since 1.0
    assert sleeper.due(2.0) == ["a"]  # b, awake and empty, has room
