"""The scheduler on the real block manager, without a model: admission rules under pressure."""

from __future__ import annotations

import time

import pytest

from mell.common.sampling import SamplingParams
from mell.common.slo import RequestSLO
from mell.workerd.engine.block_manager import BlockManager
from mell.workerd.engine.scheduler import Scheduler
from mell.workerd.engine.sequence import Sequence
from mell.workerd.engine.step_model import StepTimeModel

ENDLESS = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def burst(admission: str) -> tuple[Scheduler, dict[str, int]]:
    """128 blocks x 16 tokens, 12 decoders (32-token prompts, 100 tokens out), then three
    1,500-token prompts at once; steps until each long prompt has its first token."""
    sch = Scheduler(
        BlockManager(128, 16, 2), max_num_seqs=64, max_num_batched_tokens=512, admission=admission
    )
    decoders = [Sequence(f"d{i}", [3] * 32, ENDLESS, []) for i in range(12)]
    longs = [Sequence(f"L{i}", [4] * 1500, ONE, []) for i in range(3)]
    for s in decoders:
        sch.add(s)
    first: dict[str, int] = {}
    for t in range(2000):
        if t == 3:
            for s in longs:
                sch.add(s)
        batch = sch.schedule()
        for s, n in zip(batch.seqs, batch.num_tokens, strict=True):
            s.num_computed += n
            if s.num_computed == s.num_tokens:
                s.append_token(5, 1 << 30)
        for s in [*decoders, *longs]:
            if s.output_token_ids and s.request_id.startswith("L"):
                first.setdefault(s.request_id, t - 3)
            if (s.is_finished or len(s.output_token_ids) >= 100) and s in sch.running:
                sch.remove(s)
        if len(first) == 3:
            break
    assert len(first) == 3
    return sch, first


def test_whole_prompt_admission_never_preempts_a_prompt_half_way() -> None:
    old, old_first = burst("chunk")
    new, new_first = burst("whole")
    for name, sch, first in (("chunk", old, old_first), ("whole", new, new_first)):
        print(
            f"admission {name!r}: {sch.num_preemptions_total} preemptions, "
            f"{sch.num_tokens_recomputed_total} tokens recomputed, first tokens "
            f"{sorted(first.values())} steps after arrival"
        )
    assert old.num_preemptions_total > 10 and old.num_tokens_recomputed_total > 10_000
    assert new.num_preemptions_total == 0 and new.num_tokens_recomputed_total == 0
    assert max(new_first.values()) <= max(old_first.values())
    assert new.blocks.num_free() == 128 - sum(
        new.blocks.num_blocks_of(s.request_id) for s in new.running
    )


def test_unknown_admission_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="admission"):
        Scheduler(BlockManager(4, 16, 1), max_num_seqs=1, max_num_batched_tokens=8, admission="x")


@pytest.mark.parametrize(
    ("default_s", "own_s", "admitted"),
    [
        (0.0, None, True),  # no SLO at all
        (1e-6, None, False),  # the worker's default: no slack left for a prefill
        (0.0, 1e-6, False),  # the request's own, no worker default
        (1e-6, 10.0, True),  # its own, looser than the worker's, rules
    ],
)
def test_a_requests_own_tpot_slo_rules_admission(default_s, own_s, admitted) -> None:
    """SLO-aware admission: a prompt joins the step only if the time its prefill adds (the
    fitted step-time model) fits the TPOT slack of the decoding request, computed from that
    request's own SLO (the body's extension) when it has one, else the worker's default."""
    model = StepTimeModel()
    model.record(1, 0.001)
    model.record(1001, 0.101)  # 0.1 ms per token
    sch = Scheduler(
        BlockManager(64, 16, 2),
        max_num_seqs=8,
        max_num_batched_tokens=512,
        step_model=model,
        tpot_slo_s=default_s,
    )
    decoder = Sequence("d", [3] * 10, SamplingParams(max_tokens=50, ignore_eos=True), [])
    decoder.slo = None if own_s is None else RequestSLO(tpot_s=own_s)
    sch.add(decoder)
    assert sch.schedule().seqs == [decoder]
    decoder.num_computed = 10
    decoder.append_token(5, 1 << 30)
    decoder.first_token_at = time.monotonic()
    sch.add(Sequence("p", [4] * 200, ONE, []))
    batch = sch.schedule()
    assert [s.request_id for s in batch.seqs] == (["d", "p"] if admitted else ["d"])
