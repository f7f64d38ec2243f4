"""(model, device) profiles: KV capacity, step-time model and migration boundaries.

A profile is a TOML file in `configs/profiles/` (or any path). The shipped ones are estimates
from public specs (stated in each file); `bench/profile_worker.py` writes one measured from a
real engine. The simulator and the migration choice read it; nothing here does I/O beyond loading.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from mell.common.config import load_config
from mell.common.errors import ConfigError


class ModelShape(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the KV size of one token depends on."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """2 (K and V) · layers · kv_heads · head_dim · dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


class StepTime(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Step-time model, milliseconds.

    decode step = decode_base_ms + decode_per_seq_ms · batch + decode_per_kv_token_ms · Σ context
    prefill of n tokens = prefill_base_ms + prefill_per_token_ms · n (one prompt alone)

    The worker engine batches like vLLM with chunked prefill (`workerd/scheduler.py`): a step
    computes at most `max_num_batched_tokens` tokens, one per decoding request first, the rest
    as a chunk of the oldest prompts still prefilling; such a mixed step takes the decode step
    plus prefill_per_token_ms per chunk token. 512 is the engine's default
    (`common/config.py`); the shipped GPU profiles state theirs.
    """

    decode_base_ms: float
    decode_per_seq_ms: float = 0.0
    decode_per_kv_token_ms: float = 0.0
    prefill_base_ms: float = 0.0
    prefill_per_token_ms: float
    max_num_batched_tokens: int = 512

    def decode_ms(self, batch: int, context_tokens: int) -> float:
        return (
            self.decode_base_ms
            + self.decode_per_seq_ms * batch
            + self.decode_per_kv_token_ms * context_tokens
        )

    def prefill_ms(self, tokens: int) -> float:
        return self.prefill_base_ms + self.prefill_per_token_ms * tokens if tokens > 0 else 0.0

    @property
    def chunk_ms_per_token(self) -> float:
        """Fastest chunked prefill, ms per prompt token: full chunks on a worker that decodes
        nothing (each step is one decode_base_ms plus the chunk's tokens)."""
        return self.decode_base_ms / self.max_num_batched_tokens + self.prefill_per_token_ms


class Links(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Worker-to-worker links: workers are grouped into machines of `gpus_per_machine`."""

    gpus_per_machine: int = 8
    intra_gbps: float  # GB/s between GPUs of one machine
    inter_gbps: float  # GB/s between machines
    latency_ms: float = 1.0  # fixed cost of one transfer
    comm_fraction: float = 0.5  # share of a link's epoch bandwidth migrations may use
    prefill_fraction: float = 0.25  # share of a destination's epoch it may spend re-prefilling


class Profile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One (model, device) pair."""

    name: str
    device: str
    source: str = ""  # where the numbers come from
    model: ModelShape
    block_size: int = 16
    capacity_blocks: int  # KV blocks of one worker (C)
    max_model_len: int = 0  # 0: capacity_blocks · block_size
    step: StepTime
    links: Links

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def max_len(self) -> int:
        return self.max_model_len or self.capacity_tokens


def profiles_dir() -> Path:
    import mell.configs

    return Path(mell.configs.__file__).resolve().parent / "profiles"


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (`configs/profiles/NAME.toml`) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = profiles_dir() / f"{name_or_path}.toml"
        if not path.exists():
            known = ", ".join(profile_names())
            raise ConfigError(f"unknown profile {str(name_or_path)!r}; known: {known}")
    profile = load_config(path, Profile)
    if profile.capacity_blocks <= 0 or profile.block_size <= 0:
        raise ConfigError(f"{path}: capacity_blocks and block_size must be positive")
    return profile


def dump_profile(profile: Profile) -> str:
    """TOML text of a profile (the format `load_profile` reads)."""
    lines = [f"# {profile.source}" if profile.source else "# mell profile"]
    top = {
        k: getattr(profile, k)
        for k in ("name", "device", "source", "block_size", "capacity_blocks", "max_model_len")
    }
    lines += [f"{k} = {_toml(v)}" for k, v in top.items()]
    for section in ("model", "step", "links"):
        lines += ["", f"[{section}]"]
        for field in msgspec.structs.fields(getattr(profile, section)):
            lines.append(f"{field.name} = {_toml(getattr(getattr(profile, section), field.name))}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(round(value, 6))
    return str(value)
