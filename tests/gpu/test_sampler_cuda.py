"""The sampler's logit processing and grammar masks on CUDA: the same tokens as on the CPU,
logits never copied to the host for processing, and seeded rows batch-invariant."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from mell.common.sampling import SamplingParams
from mell.common.tiny_model import ensure_tiny_model
from mell.workerd.model.grammar import Guide, grammar_tokenizer
from mell.workerd.model.sampler import Sampler, process_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
VOCAB = 512


@dataclass
class History:
    token_ids: list[int]
    num_prompt_tokens: int
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    guide: Guide | None = None


PARAMS = [
    SamplingParams(temperature=0.0, logit_bias={5: 3.0}, min_tokens=3),
    SamplingParams(temperature=0.0, repetition_penalty=1.4, frequency_penalty=0.5),
    SamplingParams(temperature=0.0, presence_penalty=1.0, min_p=0.1),
]


def test_processing_on_cuda_equals_cpu() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    hists = [History([1, 2, 5, 5], 2, frozenset({0})) for _ in PARAMS]
    cpu = process_logits(logits, PARAMS, hists)
    gpu = process_logits(logits.cuda(), PARAMS, hists)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-5)
    assert Sampler()(logits.cuda(), PARAMS, [None] * 3, hists).token_ids == cpu.argmax(-1).tolist()


def test_grammar_mask_on_cuda(tmp_path: Path) -> None:
    import llguidance

    tiny = ensure_tiny_model(tmp_path / "mell-tiny")
    llg = grammar_tokenizer(tiny / "tokenizer.json", VOCAB, (1,))
    grammar = llguidance.grammar_from("choice", '["yes", "no"]')
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0, grammar=grammar)] * 2
    outs = []
    for device in ("cpu", "cuda"):
        hists = [History([1], 1, frozenset({1}), Guide(llg, grammar, [])) for _ in params]
        outs.append(process_logits(logits.to(device), params, hists).cpu())
    assert torch.equal(outs[0].isinf(), outs[1].isinf())


def test_seeded_rows_batch_invariant_on_cuda() -> None:
    p = SamplingParams(temperature=0.9, seed=5, top_p=0.9, min_p=0.05, presence_penalty=0.5)
    row = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2), device="cpu").cuda()
    hist = History([3, 4, 4], 2)
    alone = Sampler()(row, [p], [torch.Generator().manual_seed(5)], [hist]).token_ids[0]
    others = torch.randn(7, VOCAB, device="cuda")
    batch = torch.cat([others[:3], row, others[3:]])
    params = [SamplingParams(temperature=0.7)] * 3 + [p] + [SamplingParams(top_k=5)] * 4
    gens: list[torch.Generator | None] = [None] * 8
    gens[3] = torch.Generator().manual_seed(5)
    hists = [History([1], 1)] * 3 + [hist] + [History([1], 1)] * 4
    assert Sampler()(batch, params, gens, hists).token_ids[3] == alone


def test_seeded_noise_is_drawn_on_the_device_from_seed_and_index() -> None:
    """A seeded request's generator lives on the CUDA device and its noise is a function of
    (seed, token index) there: the token equals argmax(p / E) with E drawn on the device from
    a generator seeded with token_seed(seed, index), alone or in a batch, run after run."""
    from mell.workerd.engine.sequence import Sequence, token_seed

    device = torch.device("cuda")
    p = SamplingParams(temperature=0.8, seed=42, max_tokens=4)
    seq = Sequence("r", [1, 2, 3], p, [0])
    seq.output_token_ids = [7, 8]  # the third output token is next
    gen = seq.token_generator(device)
    assert gen is not None and gen.device.type == "cuda"
    row = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3)).to(device)
    noise = torch.empty(VOCAB, device=device).exponential_(
        generator=torch.Generator(device=device).manual_seed(token_seed(42, 2))
    )
    want = int((torch.softmax(row[0] / 0.8, dim=-1) / noise).argmax())
    alone = Sampler()(row, [p], [seq.token_generator(device)], [History([1], 1)]).token_ids[0]
    assert alone == want
    others = torch.randn(5, VOCAB, device=device)
    batch = torch.cat([others[:2], row, others[2:]])
    params = [SamplingParams(temperature=1.0)] * 2 + [p] + [SamplingParams(top_k=3)] * 3
    gens: list[torch.Generator | None] = [None] * 6
    gens[2] = seq.token_generator(device)
    hists = [History([1], 1)] * 6
    assert Sampler(seed=9)(batch, params, gens, hists).token_ids[2] == want
    unseeded = [SamplingParams(temperature=1.0)] * 4
    rows = torch.randn(4, VOCAB, device=device)
    first = Sampler(seed=1)(rows, unseeded, [None] * 4).token_ids
    assert Sampler(seed=1)(rows, unseeded, [None] * 4).token_ids == first  # per sampler seed
