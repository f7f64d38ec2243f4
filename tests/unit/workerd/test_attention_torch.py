"""The torch paged attention equals dense causal attention on the same K/V (GQA, mixed batch)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from mell.workerd.attention import AttentionBatch, AttentionShape
from mell.workerd.attention_torch import TorchAttention

HQ, HKV, D, PAGE, PAGES = 8, 2, 16, 4, 64


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
    return cache, batch, q, ks, vs


def test_mixed_decode_and_prefill_batch_matches_dense() -> None:
    q_lens = [1, 1, 1, 5, 9, 1 + 0, 13]
    kv_lens = [1, 7, 30, 5, 20, 1, 13]
    # decode-first layout: sort so that q_len == 1 come first
    order = sorted(range(len(q_lens)), key=lambda i: q_lens[i] != 1)
    q_lens = [q_lens[i] for i in order]
    kv_lens = [kv_lens[i] for i in order]
    cache, batch, q, ks, vs = make_case(q_lens, kv_lens)
    backend = TorchAttention(AttentionShape(HQ, HKV, D, torch.float32, torch.device("cpu")))
    out = backend.forward(backend.plan(batch), q, cache)
    torch.testing.assert_close(out, dense_reference(q, ks, vs, q_lens, kv_lens))


def test_only_prefill_and_only_decode() -> None:
    backend = TorchAttention(AttentionShape(HQ, HKV, D, torch.float32, torch.device("cpu")))
    for q_lens, kv_lens in (([3, 8], [10, 8]), ([1, 1, 1], [4, 5, 17])):
        cache, batch, q, ks, vs = make_case(q_lens, kv_lens, seed=len(q_lens))
        out = backend.forward(backend.plan(batch), q, cache)
        torch.testing.assert_close(out, dense_reference(q, ks, vs, q_lens, kv_lens))
