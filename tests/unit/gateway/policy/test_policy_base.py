from __future__ import annotations

import pytest
from policy_fakes import FakeView

from mell.common.errors import InvalidRequest
from mell.gateway.policy.base import (
    Arrival,
    Placement,
    Policy,
    Rejection,
    WorkerStatus,
    arrival_blocks,
    make_policy,
    policy_names,
)


def test_registry_has_every_contract_name() -> None:
    for name in ("least-loaded", "round-robin", "best-fit", "worst-fit", "lb"):
        assert name in policy_names()
        policy = make_policy(name)
        assert isinstance(policy, Policy)
        assert policy.name == name


def test_unknown_policy_is_a_clear_error() -> None:
    with pytest.raises(InvalidRequest, match="unknown policy 'nope'"):
        make_policy("nope")


def test_arrival_blocks_counts_prompt_plus_one_token() -> None:
    assert arrival_blocks(Arrival("r", "m", 15, 10), 16) == 1
    assert arrival_blocks(Arrival("r", "m", 16, 10), 16) == 2


def test_least_loaded_picks_most_free_active_worker() -> None:
    view = FakeView(
        load={"a": {"x": 50}, "b": {"y": 10}, "c": {}}, status={"c": WorkerStatus.DRAINING}
    )
    got = make_policy("least-loaded").place(view, Arrival("r", "m", 100, 10))
    assert got == Placement("b")


def test_least_loaded_rejects_when_nothing_fits() -> None:
    view = FakeView(load={"a": {"x": 95}})
    got = make_policy("least-loaded").place(view, Arrival("r", "m", 16 * 10, 10))
    assert isinstance(got, Rejection)
    assert make_policy("least-loaded").plan_epoch(view, 0.0) == []


def test_no_worker_of_model_is_a_rejection() -> None:
    got = make_policy("least-loaded").place(FakeView(), Arrival("r", "other", 1, 1))
    assert isinstance(got, Rejection)
