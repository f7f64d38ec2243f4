"""Prefix caching at the gateway: workers' cache summaries in the view (`prefix_hits`), the
arrival's hashes from its prompt, cache-aware least-loaded and best-fit placement, and the
hit/query counters on /metrics."""

from __future__ import annotations

from test_cluster_view import HISTORY, FakeLink, fold, job
from test_metrics import sample

from mell.common import events as ev
from mell.common.hashing import block_hashes
from mell.common.messages import AddRequest
from mell.common.workers import CachedPrefixes, WorkerLoad
from mell.gateway.cluster.dispatcher import Dispatcher
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.view import ClusterView
from mell.gateway.policy.base import PrefixHit, make_policy

PROMPT = list(range(100))  # job("x") sends these tokens; block size 16
HASHES = block_hashes(PROMPT[:-1], 16)  # 6 blocks


def test_prefix_hits_walk_each_workers_summary() -> None:
    view = fold(HISTORY[:4])
    view.note_prefixes("w0", CachedPrefixes(in_use=HASHES[:2], free=HASHES[2:4]))
    view.note_prefixes("w1", CachedPrefixes(in_use=[], free=[HASHES[0], HASHES[2]]))
    hits = view.prefix_hits("m", HASHES)
    assert hits == {"w0": PrefixHit(64, 2), "w1": PrefixHit(16, 0)}  # w1: a gap after block 0
    assert view.prefix_hits("m", block_hashes(list(range(1, 50)), 16)) == {}
    view.note_prefixes("w0", None)  # caching off there
    assert set(view.prefix_hits("m", HASHES)) == {"w1"}
    view.note_prefixes("ghost", CachedPrefixes(free=HASHES))  # not a worker of the view
    assert set(view.prefix_hits("m", HASHES)) == {"w1"}
    view.apply(ev.EventEnvelope("test", 99, 99.0, ev.WorkerLost(worker_id="w1", reason="x")))
    assert view.prefix_hits("m", HASHES) == {}  # a lost worker's cache is gone


def dispatcher(policy: str) -> tuple[Dispatcher, FakeLink]:
    state = ClusterState(ClusterView(["m"]))
    for event in HISTORY[:4]:
        state.record(event)
    link = FakeLink()
    return Dispatcher(
        state, make_policy(policy, prefix_aware=True), link.send, Metrics(state.view), 100
    ), link


def test_placement_follows_the_cached_prefix() -> None:
    for policy in ("least-loaded", "best-fit", "mell"):
        d, link = dispatcher(policy)
        d.state.view.note_prefixes("w1", CachedPrefixes(in_use=[], free=HASHES[:3]))
        for i in range(2):
            d.submit(job(f"x{i}"))
        placed = [w for w, m in link.sent if isinstance(m, AddRequest)]
        assert placed[0] == "w1", policy  # (least-loaded would otherwise pick w0 first)


def test_cache_blind_policies_get_no_hashes() -> None:
    state = ClusterState(ClusterView(["m"]))
    for event in HISTORY[:4]:
        state.record(event)
    d = Dispatcher(state, make_policy("least-loaded"), FakeLink().send, Metrics(state.view), 9)
    assert d._prefix_hashes("m", PROMPT) == ()
    d.policy = make_policy("least-loaded", prefix_aware=True)
    assert d._prefix_hashes("m", PROMPT) == tuple(HASHES)


def test_metrics_count_prefix_cache_queries_and_hits() -> None:
    def load(queries: int, hits: int) -> WorkerLoad:
        return WorkerLoad(
            num_running=0,
            num_waiting=0,
            num_total_blocks=10,
            num_free_blocks=10,
            num_preemptions_total=0,
            prefix_cache_queries_total=queries,
            prefix_cache_hits_total=hits,
        )

    view = fold(
        [
            *HISTORY[:4],
            ev.LoadReported(worker_id="w0", load=load(100, 48)),
            ev.LoadReported(worker_id="w1", load=load(50, 16)),
        ]
    )
    text = Metrics(view).render().decode()
    assert sample(text, "mell:prefix_cache_queries_total", model_name="m") == 150
    assert sample(text, "mell:prefix_cache_hits_total", model_name="m") == 64
