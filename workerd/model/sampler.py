"""Token sampling for a batch: logit processing (a grammar's token mask, logit_bias, min_tokens,
repetition / frequency / presence penalties), greedy, temperature, min-p, top-k, top-p,
per-request seeds, logprobs.

Logits stay on their device, processed batched over the rows that need it, one row never
reading another (so a request's tokens do not depend on its batch); token ids go to the device
and only the sampled ids (and asked-for logprobs) come back. Order and semantics are vLLM's:
the grammar's mask (workerd/model/grammar.py), bias and min_tokens, then penalties
(repetition over prompt and output tokens), then temperature, min-p, top-k/top-p; greedy rows
take the argmax of the processed logits.
Random draws use the exponential-race trick (argmax of p / E with E ~ Exp(1)), each seeded
request drawing its noise from its own torch.Generator, so a seeded request gives the same
tokens whatever else is in the batch. The caller seeds that generator per token
(`Sequence.token_generator`: a function of the request's seed and the token's index), so the
draws do not depend on where the request ran before. Noise is drawn where its generator lives:
on a CUDA device for a CUDA generator (unseeded rows: the sampler's own generator on that
device), nothing copied; a CPU generator's noise is drawn on the host and copied (the CPU path).
The same seed gives the same tokens on every device of one kind; CPU and CUDA draws differ.
Log-probabilities are those of the model's raw distribution (before temperature and filters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mell.common.sampling import SamplingParams, TokenLogprobs
from mell.workerd.model.grammar import Guide, apply_masks


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class TokenHistory(Protocol):
    """What penalties and min_tokens read of a request: its tokens (prompt, then output), how
    many of them are the prompt, and the ids that would stop it."""

    token_ids: list[int]
    num_prompt_tokens: int
    stop_ids: frozenset[int]
    guide: Guide | None


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        histories: Sequence[TokenHistory] | None = None,
    ) -> SampleResult:
        """logits [R, vocab] float32 (any device); one params/generator per row; `histories`
        (one per row) are needed only when some row has penalties or min_tokens."""
        logits = logits.float()
        processed = process_logits(logits, params, histories)
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            tokens = processed.argmax(dim=-1)
        else:
            tokens = self._sample(processed, params, generators, greedy)
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(logits, params, tokens))

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        greedy: list[bool],
    ) -> torch.Tensor:
        rows, vocab = logits.shape
        dev = logits.device
        temps = [p.temperature if p.temperature > 0 else 1.0 for p in params]
        scaled = logits / torch.tensor(temps, device=dev)[:, None]
        if any(p.min_p > 0.0 for p in params):
            scaled = _min_p(scaled, params)
        if any(p.top_k > 0 and p.top_k < vocab for p in params) or any(
            p.top_p < 1.0 for p in params
        ):
            scaled = _filter(scaled, params, vocab)
        probs = torch.softmax(scaled, dim=-1)
        sampled = (probs / self._noise(rows, vocab, generators, dev)).argmax(dim=-1)
        if any(greedy):
            sampled = torch.where(torch.tensor(greedy, device=dev), logits.argmax(dim=-1), sampled)
        return sampled

    def _noise(
        self,
        rows: int,
        vocab: int,
        generators: list[torch.Generator | None],
        dev: torch.device,
    ) -> torch.Tensor:
        """Exp(1) noise [rows, vocab] on `dev`: a seeded row's from its generator, drawn on the
        generator's device; the others' from the sampler's generator (on `dev` when it is a
        CUDA device, else the CPU one)."""
        on_device = dev.type == "cuda"
        noise = torch.empty(rows, vocab, device=dev if on_device else "cpu")
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            gen = self._device_generator(dev) if on_device else self.generator
            draw = torch.empty(len(shared), vocab, device=noise.device)
            noise[shared] = draw.exponential_(generator=gen)
        for i, g in enumerate(generators):
            if g is None:
                continue
            if g.device == noise.device:
                noise[i].exponential_(generator=g)
            else:  # (a CPU generator with CUDA logits: drawn on the host)
                noise[i] = torch.empty(vocab).exponential_(generator=g).to(noise.device)
        return noise.to(dev)

    def _device_generator(self, dev: torch.device) -> torch.Generator:
        """The sampler's generator on `dev` for unseeded rows (made on first use, seeded as
        the CPU one was)."""
        gen = self._device_generators.get(dev)
        if gen is None:
            gen = self._device_generators[dev] = torch.Generator(device=dev)
            gen.manual_seed(self.seed)
        return gen

    def _logprobs(
        self, logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor
    ) -> list[TokenLogprobs | None]:
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(params)
        if not wanted:
            return out
        logp = torch.log_softmax(logits[wanted], dim=-1).cpu()
        chosen = logp.gather(1, tokens[wanted].cpu()[:, None]).squeeze(1).tolist()
        top_n = max(params[i].logprobs or 0 for i in wanted)
        top_vals, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)
        for j, i in enumerate(wanted):
            n = params[i].logprobs or 0
            ids = top_ids[j, :n].tolist() if top_ids is not None else []
            vals = top_vals[j, :n].tolist() if top_vals is not None else []
            out[i] = TokenLogprobs(chosen[j], ids, vals)
        return out


def process_logits(
    logits: torch.Tensor,
    params: list[SamplingParams],
    histories: Sequence[TokenHistory] | None,
) -> torch.Tensor:
    """The logits after the grammar masks, logit_bias, min_tokens and the penalties (a new
    tensor when any row has them, else `logits` itself)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    if histories is None:
        raise ValueError("penalties and min_tokens need the requests' token histories")
    out = logits.clone()
    guided = [i for i in rows if params[i].grammar is not None]
    if guided:
        guides = [histories[i].guide for i in guided]
        if any(g is None for g in guides):
            raise ValueError("a request with a grammar has no guide")
        apply_masks(out, guided, [g for g in guides if g is not None])
    _bias_and_min_tokens(out, params, histories, rows)
    penalised = [i for i in rows if params[i].has_penalties]
    if penalised:
        out[penalised] = _penalties(
            out[penalised], [params[i] for i in penalised], [histories[i] for i in penalised]
        )
    return out


def _bias_and_min_tokens(
    out: torch.Tensor,
    params: list[SamplingParams],
    histories: Sequence[TokenHistory],
    rows: list[int],
) -> None:
    """Add each row's logit_bias; mask its stop ids while it is short of min_tokens."""
    vocab = out.shape[1]
    bias_rows: list[int] = []
    bias_ids: list[int] = []
    bias_vals: list[float] = []
    mask_rows: list[int] = []
    mask_ids: list[int] = []
    for i in rows:
        p, h = params[i], histories[i]
        for token, value in p.logit_bias.items():
            if token < vocab:
                bias_rows.append(i)
                bias_ids.append(token)
                bias_vals.append(value)
        if len(h.token_ids) - h.num_prompt_tokens < p.min_tokens:
            stops = [t for t in h.stop_ids if t < vocab]
            mask_rows.extend([i] * len(stops))
            mask_ids.extend(stops)
    dev = out.device
    if bias_rows:
        index = (_ids(bias_rows, dev), _ids(bias_ids, dev))
        out.index_put_(index, torch.tensor(bias_vals, device=dev), accumulate=True)
    if mask_rows:
        out[_ids(mask_rows, dev), _ids(mask_ids, dev)] = float("-inf")


def _penalties(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory]
) -> torch.Tensor:
    """vLLM's apply_penalties: repetition over prompt and output tokens, frequency and presence
    over output tokens."""
    rows, vocab = logits.shape
    dev = logits.device
    out_rows: list[int] = []
    out_ids: list[int] = []
    prompt_rows: list[int] = []
    prompt_ids: list[int] = []
    for j, h in enumerate(histories):
        output = [t for t in h.token_ids[h.num_prompt_tokens :] if t < vocab]
        out_rows.extend([j] * len(output))
        out_ids.extend(output)
        prompt = [t for t in h.token_ids[: h.num_prompt_tokens] if t < vocab]
        prompt_rows.extend([j] * len(prompt))
        prompt_ids.extend(prompt)
    counts = torch.zeros(rows, vocab, device=dev)
    if out_ids:
        counts.index_put_(
            (_ids(out_rows, dev), _ids(out_ids, dev)),
            torch.ones(len(out_ids), device=dev),
            accumulate=True,
        )
    seen = counts > 0
    if any(p.repetition_penalty != 1.0 for p in params):
        in_prompt = torch.zeros(rows, vocab, dtype=torch.bool, device=dev)
        if prompt_ids:
            in_prompt[_ids(prompt_rows, dev), _ids(prompt_ids, dev)] = True
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev)[:, None]
        rep = torch.where(seen | in_prompt, rep, torch.ones_like(rep))
        logits = torch.where(logits > 0, logits / rep, logits * rep)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)[:, None]
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)[:, None]
    return logits - freq * counts - pres * seen.float()


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _min_p(scaled: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's best (vLLM's min-p)."""
    min_p = torch.tensor([p.min_p for p in params], device=scaled.device)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    keep = probs >= min_p * probs.max(dim=-1, keepdim=True).values
    return scaled.masked_fill(~keep, float("-inf"))


def _filter(scaled: torch.Tensor, params: list[SamplingParams], vocab: int) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p (nucleus) sets with -inf."""
    dev = scaled.device
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    drop = ranks >= top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def prompt_logprobs(logits: torch.Tensor, targets: list[int], top_n: int) -> list[TokenLogprobs]:
    """Log-probabilities of the prompt tokens `targets` (one per row of `logits`, the row that
    predicts it) with their rank and the top-n alternatives; only [R, top_n] leaves the device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(targets, dtype=torch.long, device=logits.device)[:, None]
    chosen = logp.gather(1, target)
    ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
    values = chosen.squeeze(1).tolist()
    top_vals, top_ids = logp.topk(top_n, dim=-1) if top_n else (None, None)
    top_v = top_vals.tolist() if top_vals is not None else [[] for _ in targets]
    top_i = top_ids.tolist() if top_ids is not None else [[] for _ in targets]
    return [
        TokenLogprobs(v, ids, vals, rank)
        for v, ids, vals, rank in zip(values, top_i, top_v, ranks, strict=True)
    ]
