"""The cluster view is a fold of events; placement sees requests placed a moment ago."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mell.common import events as ev
from mell.common.errors import InvalidRequest, NoCapacity, Overloaded, WorkerLostError
from mell.common.messages import (
    AbortRequest,
    AddRequest,
    RequestFailed,
    TokenBatch,
    TokenOutput,
)
from mell.common.sampling import SamplingParams
from mell.common.slo import RequestSLO
from mell.common.workers import RequestLoad, WorkerIdentity, WorkerLoad
from mell.gateway.cluster.dispatcher import Dispatcher, Job
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.recovery import reconcile_after_restart
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView, RequestState
from mell.gateway.policy.base import WorkerStatus, make_policy


def joined(wid: str, model: str = "m", blocks: int = 10) -> ev.WorkerJoined:
    return ev.WorkerJoined(
        identity=WorkerIdentity(
            worker_id=wid,
            boot_id="b-" + wid,
            model=model,
            capacity_blocks=blocks,
            block_size=16,
            max_model_len=256,
            data_address="",
        )
    )


def fold(events: list[Any]) -> ClusterView:
    view = ClusterView(["m"])
    for seq, event in enumerate(events, 1):
        view.apply(ev.EventEnvelope("test", seq, float(seq), event))
    return view


HISTORY = [
    joined("w0"),
    ev.WorkerActivated(worker_id="w0"),
    joined("w1"),
    ev.WorkerActivated(worker_id="w1"),
    ev.RequestPlaced(
        request_id="r1", model="m", worker_id="w0", num_prompt_tokens=20, max_tokens=8, num_blocks=2
    ),
    ev.RequestAdmitted(request_id="r1", worker_id="w0"),
    ev.LoadReported(
        worker_id="w0",
        load=WorkerLoad(
            num_running=1,
            num_waiting=0,
            num_total_blocks=10,
            num_free_blocks=7,
            num_preemptions_total=0,
            requests=[RequestLoad("r1", 3, 40)],
        ),
    ),
    ev.RequestPlaced(
        request_id="r2", model="m", worker_id="w1", num_prompt_tokens=5, max_tokens=8, num_blocks=1
    ),
]


def test_fold_builds_workers_and_requests() -> None:
    view = fold(HISTORY)
    assert [w.worker_id for w in view.workers("m")] == ["w0", "w1"]
    w0 = view.worker_rows["w0"]
    assert w0.status == WorkerStatus.ACTIVE and w0.num_used_blocks == 3
    assert dict(view.workers("m")[0].request_blocks) == {"r1": 3}
    assert view.requests["r1"].state == RequestState.RUNNING
    assert view.requests["r1"].num_tokens == 40
    assert view.requests["r2"].state == RequestState.PLACED


def test_a_request_on_the_host_tier_counts_no_device_kv() -> None:
    """Requests swapped out or parked on a worker's host tier report their device blocks (0):
    the view, which every policy packs by (MELL too), sees device KV only; the host tier's
    usage rides along in the worker's load."""
    hosted = ev.LoadReported(
        worker_id="w0",
        load=WorkerLoad(
            num_running=0,
            num_waiting=0,
            num_total_blocks=10,
            num_free_blocks=10,
            num_preemptions_total=1,
            requests=[RequestLoad("r1", 0, 40)],
            num_host_total_blocks=64,
            num_host_free_blocks=61,
            num_swapped=1,
        ),
    )
    view = fold([*HISTORY, hosted])
    w0 = view.worker_rows["w0"]
    assert dict(w0.request_blocks) == {"r1": 0} and w0.num_used_blocks == 0
    assert view.workers("m")[0].num_free_blocks == 10
    assert w0.load.num_host_free_blocks == 61 and w0.load.num_swapped == 1
    assert view.requests["r1"].num_tokens == 40


def test_same_events_same_view() -> None:
    a, b = fold(HISTORY), fold(HISTORY)
    assert a.worker_rows == b.worker_rows and a.requests == b.requests


def test_finish_and_loss_forget_requests() -> None:
    view = fold(
        [
            *HISTORY,
            ev.RequestFinished(
                request_id="r1",
                worker_id="w0",
                finish_reason="stop",
                num_prompt_tokens=20,
                num_generated_tokens=8,
            ),
            ev.WorkerLost(worker_id="w1", reason="silent"),
        ]
    )
    assert view.requests == {}
    assert [w.worker_id for w in view.workers("m")] == ["w0"]
    assert view.worker_rows["w1"].status == WorkerStatus.LOST
    assert view.totals.num_finished == 1


def test_drain_and_exit() -> None:
    view = fold([*HISTORY, ev.WorkerDrainStarted(worker_id="w1")])
    assert view.worker_rows["w1"].status == WorkerStatus.DRAINING
    assert [w.worker_id for w in view.live_workers("m")] == ["w0"]
    view = fold([*HISTORY, ev.WorkerDrained(worker_id="w1", exiting=True)])
    assert "w1" not in view.worker_rows and "r2" not in view.requests


def test_requests_gone_with_their_worker_are_tombstones_until_the_horizon() -> None:
    view = fold([*HISTORY, ev.WorkerLost(worker_id="w1", reason="silent")])
    assert "r2" not in view.requests and "r2" in view.snapshot().requests  # kept, not live
    assert view.worker_rows["w1"].request_blocks == {}
    seq = len(HISTORY) + 1
    report = ev.LoadReported(
        worker_id="w0",
        load=WorkerLoad(
            num_running=1,
            num_waiting=0,
            num_total_blocks=10,
            num_free_blocks=7,
            num_preemptions_total=0,
            requests=[RequestLoad("r1", 3, 40)],
        ),
    )
    for n in range(1, 257):  # the view prunes every 256 load reports
        view.apply(ev.EventEnvelope("test", seq + n, 1000.0 + n, report))
    assert set(view.snapshot().requests) == {"r1"} and set(view.requests) == {"r1"}


async def test_the_reconcile_deadline_ends_requests_of_a_worker_lost_before_its_hello() -> None:
    state = ClusterState(ClusterView(["m"]))
    for event in [*HISTORY, ev.WorkerLost(worker_id="w1", reason="silent for 2 s")]:
        state.record(event)
    assert "r2" not in state.view.requests and state.view.unended("r2") is not None
    sent: list[tuple[str, Any]] = []
    dead = await reconcile_after_restart(
        state, {}, lambda w, m: sent.append((w, m)), 0.01, ["r1", "r2"]
    )
    assert dead == ["r1", "r2"]
    assert sent == [("w0", AbortRequest(["r1"])), ("w1", AbortRequest(["r2"]))]
    assert state.view.unended("r2") is None and state.view.totals.num_aborted == 2


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[tuple[str, Any]] = []
        self.reachable = True

    def send(self, worker_id: str, message: Any) -> bool:
        self.sent.append((worker_id, message))
        return self.reachable


def make_dispatcher(max_in_flight: int = 100) -> tuple[Dispatcher, FakeLink, ClusterState]:
    state = ClusterState(ClusterView(["m"]))
    for event in HISTORY[:4]:
        state.record(event)
    link = FakeLink()
    d = Dispatcher(
        state, make_policy("least-loaded"), link.send, Metrics(state.view), max_in_flight
    )
    return d, link, state


def job(rid: str, prompt: int = 100) -> Job:
    return Job(rid, "m", list(range(prompt)), SamplingParams(max_tokens=4), 0.0)


def test_back_to_back_placements_see_each_other() -> None:
    d, link, state = make_dispatcher()
    recorded: list[ev.EventEnvelope] = []
    state.add_append_hook(recorded.append)
    d.submit(job("a"))
    d.submit(job("b"))
    workers = [m.request_id and w for w, m in link.sent if isinstance(m, AddRequest)]
    assert sorted(workers) == ["w0", "w1"]  # least-loaded spread them: b saw a
    assert [type(e.event).__name__ for e in recorded] == ["RequestPlaced", "RequestPlaced"]


def test_overload_and_no_capacity() -> None:
    d, _, _ = make_dispatcher(max_in_flight=1)
    d.submit(job("a", prompt=10))
    with pytest.raises(Overloaded):
        d.submit(job("b", prompt=10))
    d, _, _ = make_dispatcher()
    with pytest.raises(NoCapacity):
        d.submit(job("huge", prompt=16 * 20))  # more blocks than any worker has


async def test_fan_out_release_and_abort() -> None:
    d, link, state = make_dispatcher()
    s = d.submit(job("a", prompt=10))
    d.on_token_batch(
        s.worker_id,
        TokenBatch(
            1,
            [
                TokenOutput("a", 0, [1, 2], None, None, 10),
                TokenOutput("ghost", 0, [3], None, None, 1),
            ],
        ),
    )
    assert [o.token_ids for o in await s.next(1.0)] == [[1, 2]]
    assert (s.worker_id, AbortRequest(["ghost"])) in link.sent
    assert state.view.requests["a"].state == RequestState.RUNNING
    d.release(s, None, "client disconnected", 2)
    assert (s.worker_id, AbortRequest(["a"])) in link.sent
    assert "a" not in state.view.requests and d.streams == {}


async def test_worker_rejection_becomes_the_clients_error() -> None:
    d, _, _ = make_dispatcher()
    s = d.submit(job("a", prompt=10))
    d.on_request_failed(
        s.worker_id,
        RequestFailed(request_id="a", code="BadRequestError", message="prompt too long"),
    )
    with pytest.raises(InvalidRequest, match="prompt too long"):
        await s.next(1.0)


def lose(d: Dispatcher, state: ClusterState, worker_id: str) -> None:
    """What the link does: the view first, then the dispatcher."""
    state.record(ev.WorkerLost(worker_id=worker_id, reason="silent"))
    d.on_worker_lost(worker_id, "silent")


async def test_a_lost_workers_stream_resumes_elsewhere_from_its_tokens() -> None:
    d, link, state = make_dispatcher()
    recorded: list[ev.EventEnvelope] = []
    state.add_append_hook(recorded.append)
    s = d.submit(job("a", prompt=10))
    first = s.worker_id
    d.on_token_batch(first, TokenBatch(1, [TokenOutput("a", 0, [4, 5], None, None, 10)]))
    lose(d, state, first)
    second = s.worker_id
    assert second != first and not s.done
    assert link.sent[-1] == (second, AddRequest("a", list(range(10)), job("a").sampling, [4, 5]))
    resumed = [e.event for e in recorded if isinstance(e.event, ev.RequestResumed)]
    assert resumed == [
        ev.RequestResumed(
            request_id="a",
            model="m",
            lost_worker_id=first,
            worker_id=second,
            num_prompt_tokens=10,
            num_output_tokens=2,
            max_tokens=4,
            num_blocks=1,
        )
    ]
    assert state.view.requests["a"].worker_id == second
    assert state.view.totals.num_resumed == 1
    assert b'mell:requests_resumed_total{model_name="m"} 1.0' in d.metrics.render()
    d.on_token_batch(first, TokenBatch(2, [TokenOutput("a", 2, [9], None, None, 10)]))
    d.on_token_batch(second, TokenBatch(1, [TokenOutput("a", 2, [6, 7], None, "length", 10)]))
    assert s.token_ids == [4, 5, 6, 7] and s.finish_reason == "length"  # the lost one's dropped
    lose(d, state, second)  # finished: nothing to resume


async def test_a_requests_own_slos_go_to_its_worker_and_along_a_resume() -> None:
    d, link, state = make_dispatcher()
    slo = RequestSLO(ttft_s=0.5, tpot_s=0.02)
    s = d.submit(Job("a", "m", list(range(10)), SamplingParams(max_tokens=4), 0.0, slo=slo))
    first = s.worker_id
    [placed] = [m for _, m in link.sent if isinstance(m, AddRequest)]
    assert placed.slo == slo
    lose(d, state, first)
    assert link.sent[-1] == (
        s.worker_id,
        AddRequest("a", list(range(10)), job("a").sampling, [], slo),
    )


async def test_worker_loss_fails_its_streams_when_no_worker_can_take_them() -> None:
    d, _, state = make_dispatcher()
    s = d.submit(job("a", prompt=10))
    lose(d, state, s.worker_id)
    lose(d, state, s.worker_id)
    with pytest.raises(WorkerLostError, match="no worker can resume it"):
        await asyncio.wait_for(s.next(1.0), 1.0)


async def test_request_is_placed_again_when_its_worker_dies_before_the_first_token() -> None:
    from mell.gateway.api.generation import start

    d, link, state = make_dispatcher()
    starting = asyncio.create_task(start(d, job("a", prompt=10), 5.0))
    await asyncio.sleep(0)
    first = d.streams["a"].worker_id
    lose(d, state, first)
    for _ in range(100):
        await asyncio.sleep(0)
        if "a" in d.streams and d.streams["a"].worker_id != first:
            break
    second = d.streams["a"].worker_id
    assert second != first
    d.on_token_batch(second, TokenBatch(1, [TokenOutput("a", 0, [4], None, None, 10)]))
    stream, outputs = await starting
    assert stream.worker_id == second and outputs[0].token_ids == [4]
    assert [w for w, m in link.sent if isinstance(m, AddRequest)] == [first, second]


async def test_outputs_from_a_worker_that_no_longer_holds_the_request_are_dropped() -> None:
    d, link, _ = make_dispatcher()
    s = d.submit(job("a", prompt=10))
    other = "w1" if s.worker_id == "w0" else "w0"
    d.on_token_batch(other, TokenBatch(1, [TokenOutput("a", 0, [9], None, None, 10)]))
    assert s.next_index == 0
    assert (other, AbortRequest(["a"])) in link.sent
