"""Greedy outputs of the engine equal transformers `generate`, token for token.

Tiny random checkpoints written by transformers itself (float32): Llama with full MHA, Llama
with GQA and llama3 RoPE scaling, Qwen2 with q/k/v biases and tied embeddings, Mistral (GQA, a
40-token sliding window), Qwen3 (q/k norms), Gemma 2 (soft-capping, sliding layers between
global ones, query_pre_attn_scalar, GELU-tanh, Gemma norms), Gemma 3 (q/k norms, its own RoPE
on the sliding layers), Phi-3 (fused projections, LongRoPE: short factors when served at the
original 512 tokens, long ones past it). The norms' weights are random too. 20
requests submitted at once with prompts of 1..300 tokens, chunked prefill forced on by a step
budget below the longest prompt: once with a roomy KV pool (at least 16 requests running at
the same time) and once with a pool so small that requests are preempted and recomputed.
Requests stop at EOS as transformers does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest
from engine_models import PHI3_ORIGINAL_LEN, VOCAB, make_checkpoint, reference_greedy

from mell.common.config import EngineConfig
from mell.common.sampling import FinishReason, SamplingParams
from mell.workerd.engine.engine import Engine

pytestmark = pytest.mark.slow

KINDS = ["llama", "llama-gqa-llama3", "qwen2", "mistral", "qwen3", "gemma2", "gemma3", "phi3"]
# Phi-3 served at its original length uses LongRoPE's short factors, as transformers does for
# sequences that fit in it (test_phi3_long_prompts_use_long_factors covers the long ones).
OPTIONS = {"phi3": {"max_model_len": PHI3_ORIGINAL_LEN}}
NUM_REQUESTS = 20


def _workload(seed: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    lengths = [1, 300, 2, 17, 64, 65, 128, 255] + [rng.randint(1, 300) for _ in range(12)]
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in lengths]
    max_new = [rng.randint(8, 40) for _ in prompts]
    return prompts, max_new


@pytest.fixture(scope="module", params=KINDS)
def case(request, tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    prompts, max_new = _workload(seed=KINDS.index(request.param))
    reference = reference_greedy(directory, prompts, max_new)
    return directory, prompts, max_new, reference, OPTIONS.get(request.param, {})


@dataclass
class Run:
    tokens: dict[str, list[int]]
    reasons: dict[str, FinishReason]
    engine: Engine
    peak_running: int


def run_engine(directory: Path, prompts: list[list[int]], max_new: list[int], **engine) -> Run:
    eng = Engine(EngineConfig(model=str(directory), block_size=16, **engine))
    for i, (prompt, n) in enumerate(zip(prompts, max_new, strict=True)):
        eng.add_request(f"r{i}", prompt, SamplingParams(max_tokens=n, temperature=0.0))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    reasons: dict[str, FinishReason] = {}
    peak = 0
    for _ in range(200_000):  # (steps only wait while host-tier copies land)
        if not eng.has_unfinished():
            break
        outputs = eng.step()
        peak = max(peak, eng.stats().num_running)
        for out in outputs:
            assert out.request_id not in reasons, "output after the final one"
            assert out.first_index == len(tokens[out.request_id]), "gap or duplicate"
            tokens[out.request_id] += out.new_token_ids
            if out.finish_reason is not None:
                reasons[out.request_id] = out.finish_reason
    assert not eng.has_unfinished()
    assert set(reasons) == set(tokens), "a request never finished"
    stats = eng.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked"
    return Run(tokens, reasons, eng, peak)


def _expected(reference: list[list[int]]) -> dict[str, list[int]]:
    return {f"r{i}": ids for i, ids in enumerate(reference)}


def test_greedy_matches_transformers_with_chunked_prefill(case) -> None:
    directory, prompts, max_new, reference, options = case
    run = run_engine(
        directory, prompts, max_new, max_num_batched_tokens=256, max_num_seqs=32, **options
    )
    assert run.peak_running >= 16
    assert run.tokens == _expected(reference)
    for i, ids in enumerate(reference):  # token 1 is EOS in these checkpoints
        assert run.reasons[f"r{i}"] is (FinishReason.STOP if ids[-1] == 1 else FinishReason.LENGTH)


def test_greedy_matches_transformers_under_preemption(case) -> None:
    directory, prompts, max_new, reference, options = case
    # 48 blocks of 16 tokens: the longest request alone needs 22 of them. The old admission
    # rule (blocks for the first chunk only) preempts; the whole-prompt rule must give the same.
    for admission in ("chunk", "whole"):
        run = run_engine(
            directory,
            prompts,
            max_new,
            max_num_batched_tokens=128,
            max_num_seqs=32,
            num_kv_blocks=48,
            admission=admission,
            **options,
        )
        if admission == "chunk":
            assert run.engine.stats().num_preemptions_total > 0
        assert run.tokens == _expected(reference)


@pytest.mark.parametrize("offload", ["swap", "layerwise"])
def test_greedy_matches_transformers_with_the_host_kv_tier(case, offload) -> None:
    """Forced: every prompt parks on the host after its prefill (layerwise) and running
    requests are swapped out at random; tokens must not change, and nothing leaks."""
    directory, prompts, max_new, reference, options = case
    run = run_engine(
        directory,
        prompts,
        max_new,
        max_num_batched_tokens=128,
        max_num_seqs=32,
        num_kv_blocks=48,
        kv_offload=offload,
        host_kv_bytes=1 << 24,
        kv_offload_force=True,
        **options,
    )
    stats = run.engine.stats()
    assert stats.num_swaps_total > 0
    if offload == "layerwise":
        assert stats.num_parked_total >= len(prompts)
    assert stats.num_host_free_blocks == stats.num_host_total_blocks
    assert run.tokens == _expected(reference)
    run.engine.close()


def test_sharded_checkpoint_gives_the_same_tokens(case, tmp_path) -> None:
    directory, prompts, max_new, reference, options = case
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    run = run_engine(tmp_path, prompts[:6], max_new[:6], max_num_batched_tokens=512, **options)
    assert run.tokens == _expected(reference[:6])


def test_mell_tiny_matches_transformers(tmp_path) -> None:
    """The built-in model loads in transformers too, and both decode it alike."""
    from mell.common.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path / "tiny", seed=0)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 200))] for _ in range(8)]
    max_new = [12] * len(prompts)
    reference = reference_greedy(model, prompts, max_new)
    run = run_engine(model, prompts, max_new, max_num_batched_tokens=128)
    assert run.tokens == _expected(reference)


def test_transformers_v4_config_spelling_gives_the_same_tokens(case, tmp_path) -> None:
    """The checkpoint's config rewritten the v4 way (rope_theta/rope_scaling with "type",
    Gemma 3's rope_local_base_freq and sliding_window_pattern instead of per-layer-type RoPE
    and layer_types, torch_dtype): the engine reads the same model."""
    import json
    import shutil

    directory, prompts, max_new, reference, options = case
    for f in directory.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = dict(config.pop("rope_parameters"))
    if "sliding_attention" in rope:  # Gemma 3 (its tiny layers: sliding, full, sliding)
        config["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        config["sliding_window_pattern"] = 2
        rope = dict(rope["full_attention"])
    config.pop("layer_types", None)
    config["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    config["torch_dtype"] = config.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    run = run_engine(tmp_path, prompts[:6], max_new[:6], max_num_batched_tokens=512, **options)
    assert run.tokens == _expected(reference[:6])


def test_phi3_long_prompts_use_long_factors(tmp_path) -> None:
    """Served past its original length (max_model_len 1024 > 512), Phi-3 uses LongRoPE's long
    factors: the same tokens as transformers for prompts longer than 512 tokens."""
    directory = make_checkpoint(tmp_path / "phi3", "phi3")
    rng = random.Random(11)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (513, 600, 777)]
    max_new = [16, 9, 24]
    reference = reference_greedy(directory, prompts, max_new)
    run = run_engine(directory, prompts, max_new, max_num_batched_tokens=256)
    assert run.engine.max_model_len == 1024
    assert run.tokens == _expected(reference)


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path) -> None:
    """Gemma3ForConditionalGeneration: the engine reads text_config and the language_model.
    tensors (the vision tower is left alone); text-only greedy tokens equal transformers'."""
    directory = make_checkpoint(tmp_path / "gemma3mm", "gemma3-multimodal")
    prompts, max_new = _workload(seed=21)
    prompts, max_new = prompts[:8], max_new[:8]
    reference = reference_greedy(directory, prompts, max_new)
    run = run_engine(directory, prompts, max_new, max_num_batched_tokens=128)
    assert run.tokens == _expected(reference)
