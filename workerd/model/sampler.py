"""Token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Filters run batched over the rows that need them. Random draws use the exponential-race trick
(argmax of p / E with E ~ Exp(1)), with each seeded request drawing its noise from its own
torch.Generator, so a seeded request gives the same tokens whatever else is in the batch. The
caller seeds that generator per token (`Sequence.token_generator`: a function of the request's
seed and the token's index), so the draws do not depend on where the request ran before.
Log-probabilities are those of the model's raw distribution (before temperature and filters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mell.common.sampling import SamplingParams, TokenLogprobs


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> SampleResult:
        """logits [R, vocab] float32 (any device); one params/generator per row."""
        logits = logits.float()
        greedy = [p.is_greedy for p in params]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, params, generators, greedy)
        token_list = tokens.tolist()
        return SampleResult(token_list, self._logprobs(logits, params, tokens))

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        greedy: list[bool],
    ) -> torch.Tensor:
        _rows, vocab = logits.shape
        temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params])
        scaled = logits.cpu() / temps[:, None]
        if any(p.top_k > 0 and p.top_k < vocab for p in params) or any(
            p.top_p < 1.0 for p in params
        ):
            scaled = _filter(scaled, params, vocab)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            noise[shared] = torch.empty(len(shared), vocab).exponential_(generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            sampled = torch.where(torch.tensor(greedy), logits.cpu().argmax(dim=-1), sampled)
        return sampled.to(logits.device)

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


def _filter(scaled: torch.Tensor, params: list[SamplingParams], vocab: int) -> torch.Tensor:
    """Mask tokens outside each row's top-k and top-p (nucleus) sets with -inf."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    drop = ranks >= top_k[:, None]
    top_p = torch.tensor([p.top_p for p in params])
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)
