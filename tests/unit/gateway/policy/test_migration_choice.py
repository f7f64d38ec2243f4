from __future__ import annotations

from mell.gateway.policy.base import Move
from mell.gateway.policy.migration_choice import TransferModel, choose_transfers

MIB = 1 << 20


def model(**kw) -> TransferModel:
    def link_of(src: str, dst: str) -> str:
        return "intra" if src[0] == dst[0] else "inter"

    base = {
        "kv_bytes_per_token": MIB // 2,  # LLaMA-2-7B
        "link_of": link_of,
        "link_bytes_per_s": {"intra": 20e9, "inter": 1.25e9},
        "default_prefill_tps": 6000.0,
        "epoch_s": 1.0,
        "comm_fraction": 1.0,
        "prefill_fraction": 1.0,
        "latency_s": 0.0,
    }
    base.update(kw)
    return TransferModel(**base)


def test_fast_link_prefers_kv_slow_link_prefers_tokens() -> None:
    moves = [Move("a", "m0", "m1"), Move("b", "m0", "x1")]  # m0->m1 intra, m0->x1 inter
    plan = choose_transfers(moves, {"a": 1000, "b": 1000}, model())
    assert [m.request_id for m in plan.kv] == ["a"]
    assert [m.request_id for m in plan.tokens] == ["b"]
    assert plan.deferred == []


def test_spent_budget_falls_back_to_the_other_kind_then_defers() -> None:
    # inter link: 1.25 GB per epoch = 2384 tokens of KV; prefill: 3000 tokens per epoch at x1
    m = model(default_prefill_tps=3000.0)
    moves = [Move(r, "m0", "x1") for r in ("a", "b", "c")]
    plan = choose_transfers(moves, {"a": 2000, "b": 2000, "c": 2000}, m)
    assert len(plan.tokens) == 1 and len(plan.kv) == 1
    assert [mv.request_id for mv in plan.deferred] == ["c"]


def test_kind_fixed_by_policy_is_respected() -> None:
    plan = choose_transfers([Move("a", "m0", "x1", "kv")], {"a": 100}, model())
    assert plan.kv == [Move("a", "m0", "x1", "kv")]


def test_oversize_kv_may_start_on_an_idle_link_but_not_share_it() -> None:
    m = model(link_bytes_per_s={"intra": 1e6, "inter": 1e6}, default_prefill_tps=1.0)
    moves = [Move("a", "m0", "m1"), Move("b", "m0", "m1")]
    plan = choose_transfers(moves, {"a": 100, "b": 50}, m)
    assert [mv.request_id for mv in plan.kv] == ["a"]  # largest first takes the idle link
    assert [mv.request_id for mv in plan.deferred] == ["b"]


def test_kv_bytes_per_token_from_model_shape() -> None:
    from mell.gateway.sim.profile import load_profile

    assert load_profile("llama2-7b-rtx4090").model.kv_bytes_per_token == MIB // 2
    assert load_profile("llama3-8b-h100-80g").model.kv_bytes_per_token == 128 * 1024


def test_uniform_model_for_a_single_machine() -> None:
    m = TransferModel.uniform(MIB // 2, 20e9, 6000.0, 0.25)
    plan = choose_transfers([Move("a", "w0", "w1"), Move("b", "w2", "w3")], {"a": 500, "b": 10}, m)
    assert [mv.request_id for mv in plan.kv] == ["a", "b"]


def test_a_group_goes_whole_or_waits_and_gives_its_budget_back() -> None:
    # inter link: 2384 tokens of KV per epoch; x1 prefills 3000 tokens per epoch.
    m = model(default_prefill_tps=3000.0)
    group = [Move(r, "m0", "x1", "kv", "empty:m0") for r in ("a", "b")]  # 2 × 2000: no room
    alone = Move("c", "m0", "x1", "kv")
    plan = choose_transfers([*group, alone], {"a": 2000, "b": 2000, "c": 1500}, m)
    # "a" alone would have fit; its group could not, so both wait and "c" gets the link.
    assert sorted(mv.request_id for mv in plan.deferred) == ["a", "b"]
    assert plan.kv == [Move("c", "m0", "x1", "kv")]
    # A group that fits goes whole, its kinds chosen move by move, and keeps its group.
    fits = [Move(r, "m0", "x1", group="empty:m0") for r in ("a", "b")]
    plan = choose_transfers(fits, {"a": 2000, "b": 2000}, m)
    assert plan.deferred == [] and len(plan.kv) == 1 and len(plan.tokens) == 1
    assert {mv.group for mv in plan.chosen} == {"empty:m0"}
