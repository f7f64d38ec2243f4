"""The sampler: greedy, filters, per-request seeds independent of the batch, logprobs."""

from __future__ import annotations

import math

import torch

from mell.common.sampling import SamplingParams
from mell.workerd.model.sampler import Sampler

VOCAB = 50


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_greedy_is_argmax() -> None:
    logits = _logits(4)
    out = Sampler()(logits, [SamplingParams(temperature=0.0)] * 4, [None] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 4


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = _logits(3)
    params = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.5, top_p=1e-6),
        SamplingParams(temperature=0.0),
    ]
    for _ in range(5):
        assert Sampler()(logits, params, [None] * 3).token_ids == logits.argmax(-1).tolist()


def test_top_k_limits_the_choices() -> None:
    logits = _logits(1).repeat(200, 1)
    allowed = set(logits[0].topk(3).indices.tolist())
    out = Sampler(seed=1)(logits, [SamplingParams(top_k=3)] * 200, [None] * 200)
    assert set(out.token_ids) <= allowed and len(set(out.token_ids)) > 1


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    row = _logits(1, seed=7)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = [Sampler(seed=0)(row, [p], [_gen(42)]).token_ids[0] for _ in range(1)]
    other = _logits(5, seed=8)
    batch = torch.cat([other[:2], row, other[2:]])
    params = [SamplingParams(temperature=0.7)] * 2 + [p] + [SamplingParams(temperature=0.0)] * 3
    gens = [None, _gen(1), _gen(42), None, None, _gen(3)]
    mixed = Sampler(seed=99)(batch, params, gens).token_ids[2]
    assert mixed == alone[0]
    # and a sequence of draws is reproducible
    g1, g2 = _gen(5), _gen(5)
    s = Sampler()
    seq1 = [s(row, [p], [g1]).token_ids[0] for _ in range(10)]
    seq2 = [s(row, [p], [g2]).token_ids[0] for _ in range(10)]
    assert seq1 == seq2 and len(set(seq1)) > 1


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1] + [1e-9] * (VOCAB - 3)])).repeat(4000, 1)
    out = Sampler(seed=3)(logits, [SamplingParams()] * 4000, [None] * 4000).token_ids
    share = out.count(0) / len(out)
    assert 0.65 < share < 0.75


def test_logprobs_of_sampled_and_top_n() -> None:
    logits = _logits(2)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)]
    out = Sampler()(logits, params, [None, None])
    lp = out.logprobs[0]
    assert out.logprobs[1] is None
    expected = torch.log_softmax(logits[0], -1)
    assert math.isclose(lp.logprob, expected.max().item(), rel_tol=1e-5)
    assert lp.top_token_ids == expected.topk(3).indices.tolist()
    assert lp.top_token_ids[0] == out.token_ids[0]
    assert len(lp.top_logprobs) == 3
    zero = Sampler()(logits[:1], [SamplingParams(temperature=0.0, logprobs=0)], [None])
    assert zero.logprobs[0].top_token_ids == []
