"""The engine contract (`ServingEngine`) on mell-tiny: validation, abort, stops, seeds, stats."""

from __future__ import annotations

import pytest
import torch

from mell.common.config import EngineConfig
from mell.common.errors import ConfigError, InvalidRequest
from mell.common.sampling import FinishReason, SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.workerd.engine.engine import Engine, EngineStats, RequestOutput

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def make(tiny, **kw) -> Engine:
    kw.setdefault("max_model_len", 512)
    return Engine(EngineConfig(model=str(tiny), **kw))


def drain(
    eng: Engine, first: list[RequestOutput] = ()
) -> tuple[dict[str, list[int]], dict[str, RequestOutput]]:
    """Step until idle; check numbering; return tokens and last output per request."""
    tokens: dict[str, list[int]] = {}
    last: dict[str, RequestOutput] = {}
    steps = [first]
    while eng.has_unfinished() or steps:
        outputs = steps.pop() if steps else eng.step()
        for out in outputs:
            got = tokens.setdefault(out.request_id, [])
            assert out.first_index == len(got)
            assert out.request_id not in last or last[out.request_id].finish_reason is None
            got += out.new_token_ids
            last[out.request_id] = out
    return tokens, last


def prompt(n: int, start: int = 5) -> list[int]:
    return [(start + 7 * i) % 500 + 3 for i in range(n)]


def test_add_request_validation(tiny) -> None:
    eng = make(tiny)
    with pytest.raises(InvalidRequest, match="empty"):
        eng.add_request("a", [], GREEDY)
    with pytest.raises(InvalidRequest, match="512"):
        eng.add_request("a", [1, 512], GREEDY)
    with pytest.raises(InvalidRequest, match=r"500 tokens \+ max_tokens 20 = 520 .* 512"):
        eng.add_request("a", prompt(500), SamplingParams(max_tokens=20))
    with pytest.raises(InvalidRequest, match="temperature"):
        eng.add_request("a", [3], SamplingParams(temperature=5.0))
    eng.add_request("a", [3], GREEDY)
    with pytest.raises(InvalidRequest, match="duplicate"):
        eng.add_request("a", [3], GREEDY)
    assert eng.model_config.vocab_size == 512 and eng.model_config.max_model_len == 512


def test_outputs_stats_and_finish_reasons(tiny) -> None:
    eng = make(tiny)
    assert eng.step() == [] and not eng.has_unfinished()
    eng.add_request("a", prompt(40), GREEDY)
    eng.add_request("b", prompt(3), SamplingParams(max_tokens=3, temperature=0.0, logprobs=2))
    stats = eng.stats()
    assert isinstance(stats, EngineStats)
    assert (stats.num_waiting, stats.num_running, stats.block_size) == (2, 0, 16)
    first = eng.step()
    assert {o.request_id for o in first} == {"a", "b"}
    assert eng.stats().request_blocks == {"a": 3, "b": 1}
    tokens, last = drain(eng, first)
    assert len(tokens["a"]) == 8 and len(tokens["b"]) == 3
    assert last["a"].finish_reason is FinishReason.LENGTH
    assert last["b"].num_prompt_tokens == 3
    out_b = next(o for o in first if o.request_id == "b")
    assert out_b.logprobs is not None and len(out_b.logprobs) == 1
    assert len(out_b.logprobs[0].top_token_ids) == 2
    stats = eng.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.request_blocks == {}


def test_stop_token_ids_and_eos(tiny) -> None:
    eng = make(tiny)
    eng.add_request("probe", prompt(10), GREEDY)
    tokens, _ = drain(eng)
    stop_at = tokens["probe"][2]
    idx = tokens["probe"].index(stop_at)
    eng.add_request(
        "s",
        prompt(10),
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]),
    )
    tokens2, last = drain(eng)
    assert tokens2["s"] == tokens["probe"][: idx + 1]
    assert last["s"].finish_reason is FinishReason.STOP
    # the same token as EOS: stops unless ignore_eos
    eng.model_config.eos_token_ids.append(stop_at)
    eng.add_request("e", prompt(10), SamplingParams(max_tokens=8, temperature=0.0))
    eng.add_request("i", prompt(10), GREEDY)
    tokens3, last = drain(eng)
    assert (
        tokens3["e"] == tokens["probe"][: idx + 1] and last["e"].finish_reason is FinishReason.STOP
    )
    assert tokens3["i"] == tokens["probe"]


def test_abort_frees_blocks_at_once(tiny) -> None:
    eng = make(tiny)
    eng.add_request("a", prompt(100), SamplingParams(max_tokens=50, temperature=0.0))
    eng.add_request("b", prompt(20), SamplingParams(max_tokens=50, temperature=0.0))
    eng.step()
    eng.step()
    held = eng.stats().request_blocks["a"]
    free = eng.stats().num_free_blocks
    assert held >= 7
    assert eng.abort("a") is True
    assert eng.stats().num_free_blocks == free + held
    assert "a" not in eng.stats().request_blocks
    assert eng.abort("a") is False and eng.abort("nope") is False
    for _ in range(3):
        assert all(o.request_id == "b" for o in eng.step())
    eng.abort("b")
    assert not eng.has_unfinished() and eng.step() == []


def test_seeded_sampling_is_independent_of_batch_and_preemption(tiny) -> None:
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    eng = make(tiny)
    eng.add_request("x", prompt(30), seeded)
    alone, _ = drain(eng)
    # now among others, with a pool so small that requests get preempted and recomputed
    eng = make(tiny, num_kv_blocks=12, max_num_batched_tokens=32)
    for i in range(6):
        eng.add_request(f"o{i}", prompt(20 + 9 * i, start=i), SamplingParams(max_tokens=40))
    eng.add_request("x", prompt(30), seeded)
    mixed, _ = drain(eng)
    assert eng.stats().num_preemptions_total > 0
    assert mixed["x"] == alone["x"]
    # unseeded sampling still varies
    assert len({tuple(mixed[f"o{i}"][:5]) for i in range(6)}) > 1


def test_per_layer_tables_give_the_same_tokens(tiny) -> None:
    reqs = {f"r{i}": prompt(5 + 13 * i, start=i) for i in range(5)}
    eng = make(tiny, max_num_batched_tokens=40)
    for rid, p in reqs.items():
        eng.add_request(rid, p, GREEDY)
    uniform, _ = drain(eng)
    eng = make(tiny, max_num_batched_tokens=40)
    eng.blocks.allocate("skew", 16 * 3, layers=[0])  # layer 0's pool now differs from layer 1's
    for rid, p in reqs.items():
        eng.add_request(rid, p, GREEDY)
    first = eng.step()
    assert not eng.blocks.is_uniform("r0")
    assert eng.blocks.block_table("r0", 0) != eng.blocks.block_table("r0", 1)
    skewed, _ = drain(eng, first)
    assert skewed == uniform


def test_bfloat16_runs_and_float16_on_cpu_is_refused(tiny) -> None:
    eng = make(tiny, dtype="bfloat16")
    assert eng.kv.tensors[0].dtype == torch.bfloat16
    eng.add_request("a", prompt(9), GREEDY)
    tokens, _ = drain(eng)
    assert len(tokens["a"]) == 8
    with pytest.raises(ConfigError, match="float16"):
        make(tiny, dtype="float16")


def test_kv_pool_caps_max_model_len_and_layout(tiny) -> None:
    eng = make(tiny, num_kv_blocks=10, block_size=8)
    assert eng.model_config.max_model_len == 80
    cache = eng.kv.tensors[0]
    cfg = eng.model_config
    assert cache.shape == (10, 2, 8, cfg.num_kv_heads, cfg.head_dim)  # FlashInfer NHD pages
    assert len(eng.kv.tensors) == cfg.num_layers
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        make(tiny, max_model_len=100_000)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_request_resumed_from_its_tokens_continues_exactly(tiny, temperature) -> None:
    """Another engine, given the prompt and the first k tokens, produces the rest unchanged
    (seeded randomness is a function of (seed, index), so nothing else has to travel)."""
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=7, ignore_eos=True)
    eng = make(tiny)
    eng.add_request("r", prompt(9), params)
    whole = drain(eng)[0]["r"]
    for k in (1, 5, 11):
        other = make(tiny)
        other.add_request("r", prompt(9), params, output_token_ids=whole[:k])
        rest: list[int] = []
        while other.has_unfinished():
            for out in other.step():
                assert out.first_index == k + len(rest)
                rest += out.new_token_ids
        assert whole[:k] + rest == whole
    with pytest.raises(InvalidRequest, match="nothing left to generate"):
        make(tiny).add_request("r", prompt(9), params, output_token_ids=whole)
    with pytest.raises(InvalidRequest, match="out of the vocabulary"):
        make(tiny).add_request("r", prompt(9), params, output_token_ids=[10**6])
