"""Chained block hashes: the identity of a prompt prefix, block by block (vLLM v1's scheme).

The hash of block i covers the hash of block i-1 and block i's own tokens, so two prompts share
the hash of block i exactly when they share every token up to the end of block i. Only full
blocks are hashed; a prompt's partial last block has no hash (it is never shared).

The gateway (placement, the simulator) and the worker (its block manager) call the same
functions, so they agree bit for bit: SHA-256 over a fixed little-endian encoding, never
Python's `hash` (salted per process for str, unspecified across versions). Pure Python.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence

ROOT_HASH = 0  # the parent of a prompt's first block
_MASK = (1 << 64) - 1


def chain_hash(parent: int, block: Sequence[int]) -> int:
    """The hash of a block of token ids (or other signed 64-bit keys) after `parent`'s block:
    the first 8 bytes (little-endian, unsigned) of SHA-256(parent as u64 LE, each id as i64 LE)."""
    digest = hashlib.sha256(struct.pack(f"<Q{len(block)}q", parent & _MASK, *block)).digest()
    return int.from_bytes(digest[:8], "little")


def chain_hashes(blocks: Iterable[Sequence[int]], parent: int = ROOT_HASH) -> list[int]:
    """The chained hashes of consecutive blocks, the first one after `parent`."""
    out: list[int] = []
    for block in blocks:
        parent = chain_hash(parent, block)
        out.append(parent)
    return out


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the full blocks of `block_size` tokens of a prompt."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, not {block_size}")
    full = len(token_ids) // block_size
    return chain_hashes(token_ids[k * block_size : (k + 1) * block_size] for k in range(full))
