"""Logit processing in the sampler, against vLLM's semantics computed by hand: logit_bias,
min_tokens, repetition / frequency / presence penalties, min-p; batch invariance with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mell.common.sampling import SamplingParams
from mell.common.tiny_model import ensure_tiny_model
from mell.workerd.model.grammar import Guide, grammar_tokenizer
from mell.workerd.model.sampler import Sampler, process_logits

VOCAB = 12


@dataclass
class History:
    token_ids: list[int]
    num_prompt_tokens: int
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    guide: Guide | None = None


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_logit_bias_adds_and_forces_greedy_choice() -> None:
    logits = _logits(1)
    p = SamplingParams(temperature=0.0, logit_bias={5: 100.0, 3: -2.5})
    out = process_logits(logits, [p], [History([1], 1)])
    expected = logits.clone()
    expected[0, 5] += 100.0
    expected[0, 3] -= 2.5
    assert torch.equal(out, expected)
    assert Sampler()(logits, [p], [None], [History([1], 1)]).token_ids == [5]


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 10.0  # 2 is the EOS
    p = SamplingParams(temperature=0.0, min_tokens=2)
    short = History([1, 4], 1, frozenset({2}))  # one output token so far
    assert Sampler()(logits, [p], [None], [short]).token_ids != [2]
    done = History([1, 4, 4], 1, frozenset({2}))  # two: EOS allowed again
    assert Sampler()(logits, [p], [None], [done]).token_ids == [2]


def test_penalties_follow_vllm() -> None:
    logits = _logits(1, seed=3)
    hist = History([0, 1, 1, 7, 7, 7, 9], 3)  # prompt 0 1 1; output 7 7 7 9
    p = SamplingParams(
        temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.25
    )
    out = process_logits(logits, [p], [hist])
    exp = logits.clone()[0]
    for t in {0, 1, 7, 9}:  # repetition: prompt and output tokens
        exp[t] = exp[t] / 1.5 if exp[t] > 0 else exp[t] * 1.5
    counts = {7: 3, 9: 1}  # frequency and presence: output tokens only
    for t, c in counts.items():
        exp[t] -= 0.5 * c + 0.25
    assert torch.allclose(out[0], exp)


def test_min_p_keeps_only_likely_tokens() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05] + [1e-9] * (VOCAB - 5)]))
    p = SamplingParams(temperature=1.0, min_p=0.5)  # keep p >= 0.25
    out = Sampler(seed=1)(logits.repeat(300, 1), [p] * 300, [None] * 300)
    assert set(out.token_ids) == {0, 1}


def test_histories_required_for_penalties() -> None:
    with pytest.raises(ValueError, match="histories"):
        process_logits(_logits(1), [SamplingParams(presence_penalty=1.0)], None)


def test_seeded_penalised_row_is_batch_invariant() -> None:
    row = _logits(1, seed=11)
    hist = History([3, 4, 5, 5], 2, frozenset({0}))
    p = SamplingParams(
        temperature=0.8,
        seed=9,
        repetition_penalty=1.3,
        frequency_penalty=0.4,
        min_p=0.05,
        logit_bias={2: 1.0},
        min_tokens=4,
    )
    alone = Sampler()(row, [p], [torch.Generator().manual_seed(9)], [hist]).token_ids[0]
    other = _logits(3, seed=12)
    batch = torch.cat([other[:1], row, other[1:]])
    params = [
        SamplingParams(presence_penalty=1.0),
        p,
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=2, seed=1),
    ]
    hists = [History([1, 2], 1), hist, History([1], 1), History([6], 1)]
    gens = [None, torch.Generator().manual_seed(9), None, torch.Generator().manual_seed(1)]
    assert Sampler(seed=5)(batch, params, gens, hists).token_ids[1] == alone


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "mell-tiny")


def test_grammar_mask_constrains_and_is_batch_invariant(tiny_dir: Path) -> None:
    import re

    import llguidance
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    vocab = 512
    llg = grammar_tokenizer(tiny_dir / "tokenizer.json", vocab, (tok.token_to_id("<|im_end|>"),))
    grammar = llguidance.grammar_from("regex", "(cat|dog)s? [0-9]{2}")
    p = SamplingParams(temperature=0.9, seed=4, grammar=grammar)
    gen = torch.Generator().manual_seed(0)

    def run(batch_others: int) -> str:
        hist = History([1], 1, frozenset({tok.token_to_id("<|im_end|>")}), Guide(llg, grammar, []))
        seeds = [torch.Generator().manual_seed(4)]
        out: list[int] = []
        for step in range(12):
            rows = torch.randn(1 + batch_others, vocab, generator=gen) * 3
            rows[0] = torch.randn(vocab, generator=torch.Generator().manual_seed(step)) * 3
            params = [p] + [SamplingParams()] * batch_others
            hists = [hist] + [History([1], 1)] * batch_others
            token = Sampler()(rows, params, seeds + [None] * batch_others, hists).token_ids[0]
            if token in hist.stop_ids:
                break
            hist.token_ids.append(token)
            out.append(token)
            hist.guide.consume(token)  # type: ignore[union-attr]
            if hist.guide.stopped:  # type: ignore[union-attr]
                break
        return tok.decode(out)

    alone = run(0)
    assert re.fullmatch("(cat|dog)s? [0-9]{2}", alone), alone
    assert run(3) == alone


def test_cpu_noise_is_the_generators_exponential_draw() -> None:
    """On the CPU, a seeded row's noise is its CPU generator's Exp(1) draw (as before the
    device path existed): the token is argmax(p / E) for E drawn from that seed."""
    from mell.workerd.engine.sequence import Sequence, token_seed

    p = SamplingParams(temperature=0.7, seed=11, max_tokens=4)
    seq = Sequence("r", [1, 2], p, [0])
    gen = seq.token_generator(torch.device("cpu"))
    assert gen is not None and gen.device.type == "cpu"
    row = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    noise = torch.empty(64).exponential_(generator=torch.Generator().manual_seed(token_seed(11, 0)))
    want = int((torch.softmax(row[0] / 0.7, dim=-1) / noise).argmax())
    assert Sampler()(row, [p], [gen], [History([1], 1)]).token_ids == [want]
