"""The simulated worker batches like the engine: chunked prefill under a token budget, oldest
prompt first, decodes in the same steps, KV in memory growing chunk by chunk."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mell.gateway.sim.bound import fluid_lower_bound
from mell.gateway.sim.profile import load_profile
from mell.gateway.sim.simulator import Simulator, sim_policy
from mell.gateway.sim.traces import Trace

PROFILE = load_profile("llama2-7b-rtx4090")  # budget 2048 tokens per step, C = 14,400 tokens


def make_trace(arrival, prompt, output) -> Trace:
    n = len(arrival)
    return Trace(
        arrival_s=np.asarray(arrival, dtype=np.float64),
        prompt=np.asarray(prompt, dtype=np.int64),
        output=np.asarray(output, dtype=np.int64),
        model=np.zeros(n, dtype=np.int32),
        models=["m"],
    )


def lone_rate() -> float:
    """Prompt tokens per second of a worker that prefills and decodes nothing else."""
    return 1000.0 / PROFILE.step.chunk_ms_per_token


def simulator(trace) -> Simulator:
    return Simulator(trace, PROFILE, sim_policy("best-fit", PROFILE, 0.5), sample_series=False)


def test_a_lone_prompt_prefills_at_the_full_chunk_rate_as_the_bound_assumes() -> None:
    sim = simulator(make_trace([0.0], [6000], [20]))
    sim.run()
    assert PROFILE.step.max_num_batched_tokens == 2048
    assert sim.first_token[0] == pytest.approx(6000 / lone_rate(), rel=1e-3)


def test_prompts_on_one_worker_prefill_oldest_first() -> None:
    sim = simulator(make_trace([0.0, 0.01, 0.02], [4000, 4000, 500], [30, 30, 30]))
    sim.run()
    assert len(set(sim.worker.tolist())) == 1  # best fit stacks them on one worker
    one = 4000 / lone_rate()
    first, second, third = sim.first_token.tolist()
    assert first == pytest.approx(one, rel=1e-3)  # waits for no later prompt
    assert second >= first + 0.9 * one  # waits for the prompt queued before it
    assert third > second  # a short prompt queued last still waits its turn


def test_kv_in_memory_grows_chunk_by_chunk_while_policies_see_the_whole_prompt() -> None:
    prompt = 12_000  # 2.2 s of prefill: more than four epochs
    sim = simulator(make_trace([0.0], [prompt], [10]))
    sim._place(0, 0.0)
    sim._decode(0.0, 0.5)
    wid = sim.live[0]
    bs = PROFILE.block_size
    assert sim.view.loads[wid]["0"] == math.ceil((prompt + 1) / bs)  # reserved at placement
    computed = prompt - sim.prefill.left(0)
    assert computed == pytest.approx(0.5 * lone_rate(), abs=2)
    assert sim.mem_in_use == math.ceil(computed / bs)
    assert math.isnan(sim.first_token[0])


def test_decodes_continue_in_the_steps_that_carry_a_prefill_chunk() -> None:
    sim = simulator(make_trace([0.0, 1.0], [100, 12_000], [1000, 10]))
    sim._place(0, 0.0)
    sim._decode(0.0, 0.5)
    sim._decode(0.5, 1.0)
    sim._place(1, 1.0)
    assert sim.live[0] == sim.live[1]
    before = sim.gen[0]
    sim._decode(1.0, 1.5)
    assert sim.prefill.left(1) > 0  # the long prompt is still being prefilled
    step = PROFILE.step
    mixed_s = (
        step.decode_base_ms
        + step.decode_per_seq_ms
        + step.decode_per_kv_token_ms * (100 + before)
        + step.prefill_per_token_ms * (step.max_num_batched_tokens - 1)
    ) / 1000.0
    assert sim.gen[0] - before == pytest.approx(0.5 / mixed_s, rel=1e-6)


def test_the_bound_never_lets_a_request_start_decoding_before_the_simulator_can() -> None:
    # A burst on one pool: every prompt's first token in the simulator comes no earlier than
    # its prefill alone at the full chunk rate (the most the bound's fluid pool gives a prompt).
    n = 40
    trace = make_trace([0.01 * i for i in range(n)], [3000 + 50 * i for i in range(n)], [40] * n)
    sim = simulator(trace)
    result = sim.run()
    ideal = trace.arrival_s + trace.prompt / lone_rate()
    assert (sim.first_token >= ideal - 1e-9).all()
    assert result.lower_bound == fluid_lower_bound(trace, PROFILE, 0.5).workers
    assert result.own_bound >= result.lower_bound
