"""The torch paged attention equals dense causal attention on the same K/V (GQA, mixed batch),
also with sliding windows, soft-capped scores and a scale of its own, per layer kind."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from mell.workerd.model import attention_torch
from mell.workerd.model.attention import AttentionBatch, AttentionShape, LayerAttention
from mell.workerd.model.attention_torch import TorchAttention

HQ, HKV, D, PAGE, PAGES = 8, 2, 16, 4, 256


def dense_reference(q_all, k_all, v_all, q_lens, kv_lens):
    """Per request: queries are the last q_len positions of a kv_len context."""
    outs, row = [], 0
    for q_len, kv_len, k, v in zip(q_lens, kv_lens, k_all, v_all, strict=True):
        q = q_all[row : row + q_len].transpose(0, 1)  # [H, Q, D]
        kk = k.transpose(0, 1).repeat_interleave(HQ // HKV, 0)  # [H, T, D]
        vv = v.transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        pos_q = torch.arange(kv_len - q_len, kv_len)[:, None]
        mask = torch.arange(kv_len)[None, :] <= pos_q
        outs.append(F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask).transpose(0, 1))
        row += q_len
    return torch.cat(outs)


def make_case(q_lens, kv_lens, seed=0):
    """Random K/V scattered over random pages; returns cache, batch, q, dense k/v."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cache = torch.randn(PAGES, 2, PAGE, HKV, D)
    free = list(range(PAGES))
    rng.shuffle(free)
    tables, ks, vs = [], [], []
    for kv_len in kv_lens:
        n = -(-kv_len // PAGE)
        table = [free.pop() for _ in range(n)]
        tables.append(table)
        k = torch.randn(kv_len, HKV, D)
        v = torch.randn(kv_len, HKV, D)
        for p in range(kv_len):
            cache[table[p // PAGE], 0, p % PAGE] = k[p]
            cache[table[p // PAGE], 1, p % PAGE] = v[p]
        ks.append(k)
        vs.append(v)
    num_decode = sum(1 for q in q_lens if q == 1)
    batch = AttentionBatch(num_decode, list(q_lens), list(kv_lens), tables, PAGE)
    q = torch.randn(sum(q_lens), HQ, D)
    # this step's new K/V: the last q_len positions of each request (also in the cache)
    k_new = torch.cat([k[len(k) - n :] for k, n in zip(ks, q_lens, strict=True)])
    v_new = torch.cat([v[len(v) - n :] for v, n in zip(vs, q_lens, strict=True)])
    return cache, batch, q, ks, vs, k_new, v_new


def run(q_lens, kv_lens, seed=0):
    cache, batch, q, ks, vs, k_new, v_new = make_case(q_lens, kv_lens, seed)
    backend = TorchAttention(AttentionShape(HQ, HKV, D, torch.float32, torch.device("cpu")))
    out = backend.forward(backend.plan(batch), q, k_new, v_new, cache)
    torch.testing.assert_close(out, dense_reference(q, ks, vs, q_lens, kv_lens))
    return backend.plan(batch)


def test_mixed_decode_and_prefill_batch_matches_dense() -> None:
    # decode-first layout, each part sorted by context length (as the runner lays it out)
    run([1, 1, 1, 1, 5, 13, 9], [1, 1, 7, 30, 5, 13, 20])


def test_only_prefill_only_decode_and_fresh_prompts() -> None:
    run([3, 8], [8, 10])
    run([1, 1, 1], [4, 5, 17])
    run([2, 7, 8], [2, 7, 8])  # nothing cached before: attends to its own new K/V


def test_very_different_lengths_are_split_into_groups(monkeypatch) -> None:
    monkeypatch.setattr(attention_torch, "GROUP_OVERHEAD_PAIRS", 16)
    q_lens = [1] * 12 + [2, 40]
    kv_lens = [1, 2, 2, 3, 3, 4, 4, 5, 200, 210, 220, 230, 2, 40]
    plan = run(q_lens, kv_lens, seed=3)
    assert len(plan.groups) >= 3


def eager_reference(q_all, k_all, v_all, q_lens, kv_lens, layer):
    """Per request, written out: scaled scores, capped, windowed causal mask, softmax."""
    outs, row = [], 0
    for q_len, kv_len, k, v in zip(q_lens, kv_lens, k_all, v_all, strict=True):
        q = q_all[row : row + q_len].transpose(0, 1)  # [H, Q, D]
        kk = k.transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        vv = v.transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        scores = q @ kk.transpose(1, 2) * layer.scale
        if layer.soft_cap is not None:
            scores = layer.soft_cap * torch.tanh(scores / layer.soft_cap)
        pos_q = torch.arange(kv_len - q_len, kv_len)[:, None]
        pos_k = torch.arange(kv_len)[None, :]
        allowed = pos_k <= pos_q
        if layer.window is not None:
            allowed &= pos_k > pos_q - layer.window
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ vv).transpose(0, 1))
        row += q_len
    return torch.cat(outs)


def test_layer_kinds_windows_soft_caps_and_scales_match_eager() -> None:
    layers = [
        LayerAttention(D**-0.5),
        LayerAttention(0.1, window=6),
        LayerAttention(0.3, soft_cap=2.0),
        LayerAttention(0.3, window=1, soft_cap=2.0),
        LayerAttention(0.2, window=11, soft_cap=3.0),
    ]
    backend = TorchAttention(AttentionShape(HQ, HKV, D, torch.float32, torch.device("cpu")))
    backend.use_layers(layers)
    cases = [
        ([1, 1, 1, 1, 5, 13, 9], [1, 1, 7, 30, 5, 13, 20]),  # mixed, chunks with history
        ([2, 7, 8], [2, 7, 8]),  # fresh prompts
    ]
    for q_lens, kv_lens in cases:
        cache, batch, q, ks, vs, k_new, v_new = make_case(q_lens, kv_lens, seed=4)
        plan = backend.plan(batch)
        for layer in layers:
            out = backend.forward(plan, q, k_new, v_new, cache, layer)
            ref = eager_reference(q, ks, vs, q_lens, kv_lens, layer)
            torch.testing.assert_close(out, ref, msg=lambda m, layer=layer: f"{layer}: {m}")


def test_backend_choice_on_cpu() -> None:
    import pytest

    from mell.common.errors import ConfigError
    from mell.workerd.model.attention import make_attention_backend

    shape = AttentionShape(HQ, HKV, D, torch.float32, torch.device("cpu"))
    assert make_attention_backend("auto", shape).name == "torch"
    with pytest.raises(ConfigError, match="CUDA"):
        make_attention_backend("flashinfer", shape)  # never imports flashinfer here
