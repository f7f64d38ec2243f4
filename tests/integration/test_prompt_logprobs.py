"""Prompt logprobs (vLLM's `prompt_logprobs`) equal transformers' log-softmax over the prompt,
with chunked prefill (a step budget below the prompt) and beside other requests."""

from __future__ import annotations

import random

import pytest
import torch
from engine_models import VOCAB, make_checkpoint

from mell.common.config import EngineConfig
from mell.common.sampling import SamplingParams
from mell.workerd.engine.engine import Engine

pytestmark = pytest.mark.slow


def test_prompt_logprobs_equal_transformers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import transformers

    directory = make_checkpoint(tmp_path / "llama", "llama")
    rng = random.Random(3)
    prompt = [rng.randrange(2, VOCAB) for _ in range(70)]
    eng = Engine(EngineConfig(model=str(directory), block_size=16, max_num_batched_tokens=32))
    eng.add_request("other", prompt[:20], SamplingParams(max_tokens=4, temperature=0.0))
    eng.add_request("p", prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))
    got = None
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == "p" and out.first_index == 0:
                got = out.prompt_logprobs
            if out.request_id == "other":
                assert out.prompt_logprobs is None
    assert got is not None and len(got) == len(prompt) - 1
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for pos, entry in enumerate(got):
        row = logp[pos]
        want = row[prompt[pos + 1]].item()
        assert entry.logprob == pytest.approx(want, abs=1e-4)
        assert entry.rank == int((row > row[prompt[pos + 1]]).sum()) + 1
        assert entry.top_token_ids == row.topk(3).indices.tolist()
