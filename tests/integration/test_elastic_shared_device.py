"""Two workers of different models sharing one device through their memory budgets (multi-LLM
on one GPU, on CPU here): two engines (mell-tiny and a Qwen2-shaped checkpoint) in one
process, each with its own budget, the budgets together within the device's bytes; random
arrivals on both, interleaved steps. Every step each engine's accounting is within its budget
and the two together within the device; the memory their virtual pools hold together is too;
each produces the tokens it produces alone with a fixed pool. `mellctl up` passes each worker
its budget and refuses budgets that together exceed the device."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from engine_models import make_checkpoint

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.common.tiny_model import write_tiny_model
from mell.gateway.mellctl.main import build_parser
from mell.gateway.mellctl.up import Cluster, StartFailed, _check_budgets
from mell.workerd.engine.engine import Engine

DEVICE_BYTES = 20 << 20
BUDGETS = (9 << 20, 11 << 20)  # together: the device


def engine(model: Path, budget: int = 0) -> Engine:
    extra = {"memory_budget_bytes": budget, "kv_offload": "swap", "host_kv_bytes": 16 << 20}
    return Engine(
        EngineConfig(
            model=str(model),
            device="cpu",
            max_num_seqs=16,
            max_num_batched_tokens=256,
            max_model_len=512,
            **(extra if budget else {}),
        )
    )


def arrivals(seed: int, vocab: int) -> list[tuple[int, str, list[int], SamplingParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(14):
        n = rng.choice([12, 60, 200, 380])
        tokens = [(seed + 7 * i + 3 * j) % (vocab - 3) + 3 for j in range(n)]
        if i % 2:
            sp = SamplingParams(max_tokens=rng.randrange(4, 40), temperature=0.8, seed=i)
        else:
            sp = SamplingParams(max_tokens=rng.randrange(4, 40), temperature=0.0)
        out.append((rng.randrange(40), f"{seed}-{i}", tokens, sp))
    return sorted(out, key=lambda a: a[0])


def serve(engines: list[Engine], work: list[list], check=None) -> list[dict[str, list[int]]]:
    """Interleaved steps: each engine gets its arrivals at their step, then one step each."""
    outs: list[dict[str, list[int]]] = [{} for _ in engines]
    pending = [list(w) for w in work]
    step = 0
    while any(pending) or any(e.has_unfinished() for e in engines):
        for eng, todo, out in zip(engines, pending, outs, strict=True):
            while todo and todo[0][0] <= step:
                _, rid, tokens, sp = todo.pop(0)
                eng.add_request(rid, tokens, sp)
            for o in eng.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        if check is not None:
            check(engines)
        step += 1
        assert step < 4000
    return outs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return write_tiny_model(root / "tiny"), make_checkpoint(root / "qwen2", "qwen2")


def test_two_models_share_one_device_through_their_budgets(models) -> None:
    tiny, qwen = models
    work = [arrivals(1, 500), arrivals(2, 384)]
    alone = [serve([engine(m)], [w])[0] for m, w in zip(models, work, strict=True)]
    shared = [engine(m, b) for m, b in zip((tiny, qwen), BUDGETS, strict=True)]
    steps = 0

    def check(engines: list[Engine]) -> None:
        nonlocal steps
        total = held = 0
        for eng, budget in zip(engines, BUDGETS, strict=True):
            el = eng.elastic
            assert el is not None
            if el.last is None:
                continue
            assert el.last.total <= budget
            total += el.last.total
            assert eng.kv.storage is not None
            held += eng.kv.storage.mapped_bytes()
        assert total <= DEVICE_BYTES and held <= DEVICE_BYTES
        steps += 1

    assert serve(shared, work, check) == alone
    assert steps > 50
    assert all(e.elastic is not None and e.elastic.budget.shrinks > 0 for e in shared)
    for eng in shared:
        eng.close()


def test_mellctl_up_passes_each_worker_its_budget(tmp_path: Path) -> None:
    argv = ["up", "--workers", "2", "--memory-budget-bytes", "100", "--memory-budget-bytes", "200"]
    args = build_parser().parse_args([*argv, "--device-memory-bytes", "300"])
    _check_budgets(args)
    cluster = Cluster(args, tmp_path, ["mell-tiny"])
    for i, want in enumerate(("100", "200")):
        cmd = cluster._worker_cmd(f"w{i}", "mell-tiny", "tcp://127.0.0.1:1")
        assert cmd[cmd.index("--memory-budget-bytes") + 1] == want
    for bad, message in (
        (["--device-memory-bytes", "299"], "exceed --device-memory-bytes 299"),
        (["--memory-budget-bytes", "5"], "given 3 times for 2 workers"),
    ):
        args = build_parser().parse_args([*argv, *bad])
        with pytest.raises(StartFailed, match=message):
            _check_budgets(args)
