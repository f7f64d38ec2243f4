"""Choices of one prompt prefill it once: the block manager's fork with a copy-on-write last
block, and the engine on mell-tiny (the same tokens as separate prefills, the prompt computed
once and each follower's one token, followers of a leader that leaves, cached tokens)."""

from __future__ import annotations

import pytest

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.block_manager import BlockManager, OutOfBlocks
from mell.workerd.engine.engine import Engine, RequestOutput
from mell.workerd.engine.scheduler import ScheduledBatch


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, num_layers=2)
    bm.allocate("a", 11)  # blocks 0, 1, 2 (the third holds 3 tokens)
    copies = bm.fork_prefix("a", "b", 10)  # 2 full blocks + 2 tokens of the third
    assert bm.block_table("b", 0)[:2] == bm.block_table("a", 0)[:2]
    assert copies == [(2, 3), (2, 3)] and bm.block_table("b", 1) == [0, 1, 3]
    assert [bm.ref_count(0, b) for b in range(4)] == [2, 2, 1, 1]
    assert bm.fork_prefix("a", "c", 8) == [None, None]  # whole blocks: nothing to copy
    assert bm.block_table("c") == [0, 1] and bm.ref_count(0, 0) == 3
    bm.free("a")
    bm.free("c")
    assert [bm.ref_count(0, b) for b in range(4)] == [1, 1, 0, 1]
    assert bm.num_free() == 8 - 3
    bm.free("b")
    assert bm.num_free() == 8
    bm.allocate("x", 28)
    bm.allocate("y", 1)  # the pool is full
    with pytest.raises(OutOfBlocks):
        bm.fork_prefix("x", "z", 26)
    assert not bm.has("z") and bm.num_free() == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def make(tiny, **kw) -> Engine:
    return Engine(EngineConfig(model=str(tiny), max_model_len=512, **kw))


PROMPT = [(5 + 7 * i) % 500 + 3 for i in range(37)]  # 37 tokens: 2 blocks of 16 and 5


def sampling(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)


def run(
    eng: Engine, requests: dict[str, SamplingParams], abort: str | None = None
) -> tuple[dict[str, list[int]], dict[str, list[int]], dict[str, RequestOutput]]:
    """Tokens, tokens computed per step, and the first output of each request."""
    computed: dict[str, list[int]] = {}
    execute = eng.runner.execute

    def spy(batch: ScheduledBatch, *args):  # type: ignore[no-untyped-def]
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            computed.setdefault(seq.request_id, []).append(n)
        return execute(batch, *args)

    eng.runner.execute = spy  # type: ignore[method-assign]
    for rid, params in requests.items():
        eng.add_request(rid, PROMPT, params)
    tokens: dict[str, list[int]] = {}
    first: dict[str, RequestOutput] = {}
    steps = 0
    while eng.has_unfinished():
        for out in eng.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            first.setdefault(out.request_id, out)
        steps += 1
        if steps == 1 and abort is not None:
            eng.abort(abort)
    return tokens, computed, first


@pytest.mark.parametrize("caching", [True, False])
def test_choices_prefill_once_and_sample_as_if_alone(tiny, caching: bool) -> None:
    requests = {f"r-{i}": sampling(7 + i) for i in range(3)}
    tokens, computed, first = run(make(tiny, enable_prefix_caching=caching), requests)
    for rid, params in requests.items():
        alone, _, _ = run(make(tiny, enable_prefix_caching=False), {rid: params})
        assert tokens[rid] == alone[rid]
    assert len({tuple(t) for t in tokens.values()}) == 3
    assert computed["r-0"][0] == len(PROMPT)  # the prompt, computed once
    for rid in ("r-1", "r-2"):
        assert computed[rid][0] == 1  # each follower computes the last prompt token only
        assert first[rid].num_cached_tokens == len(PROMPT) - 1
    assert first["r-0"].num_cached_tokens == 0
    prompt_tokens = sum(n for c in computed.values() for n in c) - 3 * (12 - 1)
    assert prompt_tokens == len(PROMPT) + 2
    eng = make(tiny)
    run(eng, requests)
    assert eng.blocks.num_free() == eng.blocks.num_blocks  # nothing held after


def test_followers_go_on_alone_when_the_leader_leaves(tiny) -> None:
    # a chunked prefill (16 tokens a step): the leader is aborted after its first chunk
    requests = {f"r-{i}": sampling(7 + i) for i in range(3)}
    eng = make(tiny, max_num_batched_tokens=16, enable_prefix_caching=False)
    tokens, computed, _ = run(eng, requests, abort="r-0")
    assert "r-0" not in tokens or len(tokens["r-0"]) < 12
    for rid in ("r-1", "r-2"):
        alone, _, _ = run(make(tiny, enable_prefix_caching=False), {rid: requests[rid]})
        assert tokens[rid] == alone[rid]
    assert sum(computed["r-1"][:3]) == len(PROMPT)  # r-1 leads now: the whole prompt
    assert computed["r-2"][0] == 1  # and r-2 follows it
    assert eng.blocks.num_free() == eng.blocks.num_blocks
    assert eng.stats().num_waiting == 0


def test_a_request_wanting_prompt_logprobs_does_not_share(tiny) -> None:
    wants = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
    _, computed, _ = run(make(tiny), {"a": sampling(1), "b": wants})
    assert computed["b"][0] == len(PROMPT)


def test_a_request_arriving_after_the_prefill_takes_the_decoding_leaders_kv(tiny) -> None:
    eng = make(tiny, enable_prefix_caching=False)
    eng.add_request("lead", PROMPT, sampling(1))
    eng.step()
    eng.step()  # the leader decodes: its last prompt block holds its own tokens too
    tokens, computed, first = run(eng, {"late": sampling(2)})
    alone, _, _ = run(make(tiny, enable_prefix_caching=False), {"late": sampling(2)})
    assert tokens["late"] == alone["late"]
    assert computed["late"][0] == 1 and first["late"].num_cached_tokens == len(PROMPT) - 1
    assert eng.blocks.num_free() == eng.blocks.num_blocks
