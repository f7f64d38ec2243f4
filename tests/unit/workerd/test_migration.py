"""Live migration between two real engines: exact tokens after KV and token transfers at random
points (greedy and seeded sampling), and every failure path aborting with nothing leaked."""

from __future__ import annotations

import random
import threading
import time

import msgspec
import pytest
from migration_world import World

from mell.common.config import EngineConfig
from mell.common.messages import MigrateBlocks
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine
from mell.workerd.engine.kv_cache import block_runs
from mell.workerd.migration.settings import MigrationSettings

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def engine(tiny, **kw) -> Engine:
    kw.setdefault("max_model_len", 512)
    kw.setdefault("num_kv_blocks", 64)
    kw.setdefault("block_size", 4)
    return Engine(EngineConfig(model=str(tiny), **kw))


def prompt(n: int, start: int = 5) -> list[int]:
    return [(start + 7 * i) % 500 + 3 for i in range(n)]


def reference(tiny, prompts: dict[str, list[int]], sampling: SamplingParams) -> dict[str, list]:
    w = World({"solo": engine(tiny)})
    for rid, p in prompts.items():
        w.add("solo", rid, p, sampling)
    w.run()
    return dict(w.tokens)


def assert_no_leaks(w: World) -> None:
    for node in w.nodes.values():
        eng = node.engine
        assert not eng.has_unfinished()
        assert eng.blocks.requests() == [], (node.name, eng.blocks.requests())
        assert eng.blocks.num_free() == eng.blocks.num_blocks


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("kind", ["kv", "tokens", "mixed"])
def test_migrated_requests_produce_the_unmigrated_tokens(tiny, sampling, kind) -> None:
    prompts = {f"r{i}": prompt(9 + 5 * i, start=i) for i in range(3)}
    want = reference(tiny, prompts, sampling)
    rng = random.Random(hash((kind, sampling.seed)) & 0xFFFF)
    # k = 2 blocks: KV transfers copy in several stages while the request decodes
    w = World({"a": engine(tiny), "b": engine(tiny)}, MigrationSettings(last_stage_max_blocks=2))
    for rid, p in prompts.items():
        w.add("a", rid, p, sampling)
    committed = 0
    for _ in range(2000):
        if not any(n.engine.has_unfinished() or n.hub.busy for n in w.nodes.values()):
            break
        w.step()
        for rid in prompts:
            holder = w.holder[rid]
            if rid in w.finished or w.nodes[holder].hub.migrating(rid) or rng.random() > 0.15:
                continue
            dst = "b" if holder == "a" else "a"
            k = rng.choice(["kv", "tokens"]) if kind == "mixed" else kind
            if w.migrate(rid, holder, dst, k) is None:
                committed += 1
    w.run()
    assert dict(w.tokens) == want
    assert set(w.finished) == set(prompts)
    ends = w.ended("a") + w.ended("b")
    assert sum(e.committed for e in ends) >= 6, ends  # several times each, on average
    assert_no_leaks(w)


def test_kv_copy_in_small_messages_over_scattered_blocks(tiny) -> None:
    # Three requests decode side by side, so each one's blocks interleave with the others'
    # (a frame per block); messages of 3 blocks split every layer of a stage into several.
    prompts = {f"r{i}": prompt(17 + 3 * i, start=i) for i in range(3)}
    want = reference(tiny, prompts, GREEDY)
    a = engine(tiny)
    settings = MigrationSettings(last_stage_max_blocks=2, message_bytes=3 * a.kv.block_bytes)
    w = World({"a": a, "b": engine(tiny)}, settings)
    for rid, p in prompts.items():
        w.add("a", rid, p, GREEDY)
    for _ in range(12):
        w.step()
    assert len(block_runs(a.blocks.block_table("r1"))) > 3  # scattered
    for rid in prompts:
        assert w.migrate(rid, "a", "b", "kv") is None
    w.run()
    assert dict(w.tokens) == want
    assert [e.committed for e in w.ended("a")] == [True] * 3
    sent = [m for m in w.sent if isinstance(m, MigrateBlocks)]
    assert max(sum(ref.shape[0] for ref in m.data) for m in sent) == 3
    assert max(len(m.data) for m in sent) > 1  # several runs in one message
    assert_no_leaks(w)


def test_kv_written_on_the_io_thread_gives_the_same_tokens(tiny) -> None:
    prompts = {f"r{i}": prompt(21 + 4 * i, start=i) for i in range(2)}
    want = reference(tiny, prompts, SEEDED)
    w = World({"a": engine(tiny), "b": engine(tiny)}, MigrationSettings(last_stage_max_blocks=2))
    w.io_thread = True
    for rid, p in prompts.items():
        w.add("a", rid, p, SEEDED)
    for _ in range(8):
        w.step()
    for rid in prompts:
        assert w.migrate(rid, "a", "b", "kv") is None
    w.run()
    assert dict(w.tokens) == want
    assert [e.committed for e in w.ended("a")] == [True, True]
    assert_no_leaks(w)


def test_an_abort_racing_io_thread_writes_leaks_nothing(tiny) -> None:
    w = _start_decoding(tiny, n_prompt=60)
    assert w.migrate("r", "a", "b", "kv") is None
    w.deliver()  # the destination reserves
    src = w.nodes["a"].hub.outgoing["m1"]
    w.deliver()  # the reservation's answer: the source sends the stage's blocks
    assert src.stage == 1 and w.queue
    blocks = [w.codec.decode(f) for to, f in w.queue if to == "b"]
    blocks = [(m, raw) for m, raw in blocks if isinstance(m, MigrateBlocks)]
    assert blocks
    hub_b = w.nodes["b"].hub
    errors: list[BaseException] = []

    def io() -> None:  # the stage's blocks, over and over, while the engine thread aborts
        try:
            for _ in range(200):
                for m, raw in blocks:
                    hub_b.take_blocks(m, raw, time.monotonic())
        except BaseException as err:  # reported below
            errors.append(err)

    thread = threading.Thread(target=io)
    thread.start()
    hub_b.incoming["m1"].abort("test: source gone")
    thread.join()
    assert not errors
    b = w.nodes["b"].engine
    assert b.blocks.requests() == [] and b.blocks.num_free() == b.blocks.num_blocks


def test_malformed_kv_frame_is_dropped_and_the_migration_aborts(tiny) -> None:
    want = reference(tiny, {"r": prompt(30)}, GREEDY)
    w = _start_decoding(tiny)

    def truncate(message, frames):  # a KV frame one byte short
        return [*frames[:-1], frames[-1][:-1]] if isinstance(message, MigrateBlocks) else frames

    w.mangle = truncate
    assert w.migrate("r", "a", "b", "kv") is None
    w.run()
    [end] = w.ended("a")
    assert not end.committed and "frames arrived" in end.reason, end.reason
    assert w.tokens["r"] == want["r"]
    assert_no_leaks(w)


def _start_decoding(tiny, n_prompt=30, steps=6, **kw):
    w = World({"a": engine(tiny), "b": engine(tiny, **kw)}, MigrationSettings(step_timeout_s=0.3))
    w.add("a", "r", prompt(n_prompt), GREEDY)
    for _ in range(steps):
        w.step()
    return w


def test_destination_out_of_blocks_aborts_and_source_continues(tiny) -> None:
    want = reference(tiny, {"r": prompt(30)}, GREEDY)
    w = _start_decoding(tiny, num_kv_blocks=4)  # 30 tokens need 8 blocks of 4
    assert w.migrate("r", "a", "b", "kv") is None
    w.run()
    [end] = w.ended("a")
    assert not end.committed and "no room" in end.reason
    assert dict(w.tokens) == want
    assert_no_leaks(w)


def test_request_finishing_during_copy_aborts(tiny) -> None:
    # k = 2: stage 1 copies while the request decodes (30 tokens = 7 full blocks of 4)
    w = World({"a": engine(tiny), "b": engine(tiny)}, MigrationSettings(last_stage_max_blocks=2))
    w.add("a", "r", prompt(30), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    w.step()  # prefill: first token
    assert w.migrate("r", "a", "b", "kv") is None
    w.nodes["a"].engine.step()  # the request finishes before the destination answers
    w.nodes["a"].engine.step()
    w.run()
    [end] = w.ended("a")
    assert not end.committed and end.reason == "request finished"
    assert_no_leaks(w)


def test_destination_killed_mid_copy_source_resumes_after_deadline(tiny) -> None:
    want = reference(tiny, {"r": prompt(30)}, GREEDY)
    w = _start_decoding(tiny)
    assert w.migrate("r", "a", "b", "kv") is None
    w.deliver()  # reserve answered
    w.nodes["b"].alive = False  # killed mid-copy
    w.run()
    [end] = w.ended("a")
    assert not end.committed and "no answer" in end.reason
    assert w.tokens["r"] == want["r"]
    w.nodes["b"].alive = True
    node_b = w.nodes["b"]
    node_b.hub.poll(now=1e12)  # its reservation expires (the source is silent)
    assert_no_leaks(w)


def test_commit_rejected_aborts_and_frees_reservation(tiny) -> None:
    want = reference(tiny, {"r": prompt(30)}, GREEDY)
    w = _start_decoding(tiny)
    w.nodes["b"].hub.accepting = lambda: False  # e.g. draining
    assert w.migrate("r", "a", "b", "kv") is None
    w.run()
    [end] = w.ended("a")
    assert not end.committed and "draining" in end.reason
    assert w.tokens["r"] == want["r"]
    assert_no_leaks(w)


def test_source_killed_after_commit_request_lives_on_destination(tiny) -> None:
    want = reference(tiny, {"r": prompt(30)}, GREEDY)
    w = _start_decoding(tiny)
    assert w.migrate("r", "a", "b", "tokens") is None
    w.deliver()  # commit reaches b, which commits and answers
    w.nodes["a"].alive = False  # the source dies before it hears the answer
    w.run()
    [mig] = w.migrated_in("b")
    assert mig.request_id == "r"
    assert w.tokens["r"] == want["r"]
    b = w.nodes["b"].engine
    assert b.blocks.requests() == [] and b.blocks.num_free() == b.blocks.num_blocks


def test_handlers_are_idempotent(tiny) -> None:
    want = reference(tiny, {"r": prompt(30)}, GREEDY)
    w = _start_decoding(tiny)
    w.duplicate = True  # every peer message is delivered twice
    assert w.migrate("r", "a", "b", "kv") is None
    w.run()
    assert [e.committed for e in w.ended("a")] == [True]
    assert len(w.migrated_in("b")) == 1
    assert w.tokens["r"] == want["r"]
    assert_no_leaks(w)


def test_stage_limit_aborts(tiny) -> None:
    w = World(
        {"a": engine(tiny), "b": engine(tiny)},
        MigrationSettings(last_stage_max_blocks=0, max_stages=1),
    )
    w.add("a", "r", prompt(30), GREEDY)
    for _ in range(6):
        w.step()
    assert w.migrate("r", "a", "b", "kv") is None
    w.run()
    [end] = w.ended("a")
    assert not end.committed and "stage limit" in end.reason
    assert_no_leaks(w)


def test_import_refuses_kv_that_did_not_arrive(tiny) -> None:
    from mell.common.errors import InvalidRequest
    from mell.common.messages import MigratedRequest

    eng = engine(tiny)
    request = MigratedRequest(
        request_id="r",
        prompt_token_ids=prompt(30),
        output_token_ids=[5, 6],
        sampling=GREEDY,
        num_computed=31,
        generator_state=None,
    )
    assert eng.reserve("migrate-in:x", 3)  # 31 tokens need 8 blocks of 4
    with pytest.raises(InvalidRequest, match="did not all arrive"):
        eng.import_request("migrate-in:x", request)
    with pytest.raises(InvalidRequest, match="computed"):
        eng.import_request("migrate-in:x", msgspec.structs.replace(request, num_computed=99))
    assert eng.release("migrate-in:x") == 3
    assert eng.blocks.num_free() == eng.blocks.num_blocks and eng.request_state("r") is None


FORGED = {
    "prompt id past the vocabulary": {"prompt_token_ids": [3, 99_999]},
    "negative prompt id": {"prompt_token_ids": [-1, 5]},
    "output id past the vocabulary": {"output_token_ids": [7, 1 << 40]},
    "temperature": {"sampling": SamplingParams(max_tokens=40, temperature=-1.0)},
    "top_p": {"sampling": SamplingParams(max_tokens=40, top_p=0.0)},
    "logprobs": {"sampling": SamplingParams(max_tokens=40, logprobs=1_000_000)},
    "seed past int64": {"sampling": SamplingParams(max_tokens=40, seed=1 << 63)},
    "max_tokens": {"sampling": SamplingParams(max_tokens=0)},
    "past max_model_len": {"sampling": SamplingParams(max_tokens=10_000)},
}


@pytest.mark.parametrize("forged", FORGED.values(), ids=FORGED.keys())
def test_forged_commit_is_refused_and_the_destination_lives(tiny, forged) -> None:
    """A commit nobody reserved for, with values a new request could not have: refused (an
    ack with ok=False) as add_request refuses them; the destination keeps serving."""
    from mell.common.messages import MigrateAck, MigrateCommit, MigratedRequest

    w = World({"a": engine(tiny), "b": engine(tiny)})
    fields = {
        "request_id": "forged",
        "prompt_token_ids": prompt(8),
        "output_token_ids": [5],
        "sampling": GREEDY,
        "num_computed": 0,
        "generator_state": None,
    } | forged
    commit = MigrateCommit(
        migration_id="evil",
        src_worker_id="a",
        request=MigratedRequest(**fields),
        reply_to="a",
    )
    w.queue.append(("b", [bytes(f) for f in w.codec.encode(commit, [])]))
    w.add("b", "honest", prompt(12), GREEDY)
    w.run()
    [ack] = [m for m in w.sent if isinstance(m, MigrateAck)]
    assert not ack.ok and ack.step == "commit", ack
    assert w.migrated_in("b") == [] and "forged" not in w.tokens
    assert w.finished["honest"] == "length" and len(w.tokens["honest"]) == 40
    assert_no_leaks(w)
