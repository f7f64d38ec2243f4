"""Configuration structs and the TOML loader.

Configs are frozen msgspec Structs; unknown keys, wrong types and values out of range (ports
0..65535, timeouts > 0, sizes > 0, endpoints and devices by their form; `msgspec.Meta` on each
field) are errors that name the file and the key. Flags laid over a config are validated the
same way (`overlay`). Derived runtime values (e.g. the number of KV blocks after profiling)
never get written back into a config object.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from mell.common.errors import ConfigError

T = TypeVar("T")

Port = Annotated[int, Meta(ge=0, le=65535, description="a TCP port; 0: a free one")]
Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
PositiveCount = Annotated[int, Meta(ge=1)]
# A ZeroMQ address: tcp://HOST:PORT (HOST may be * or [IPv6]), ipc://PATH or inproc://NAME.
_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_HOST = r"(\*|\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)"
_ENDPOINT = rf"^(tcp://{_HOST}:{_PORT}|(ipc|inproc)://\S+)$"
_DEVICE = r"^(auto|cpu|cuda(:[0-9]+)?)$"
Endpoint = Annotated[str, Meta(pattern=_ENDPOINT)]
Device = Annotated[str, Meta(pattern=_DEVICE)]
_PATTERN_NAMES = {
    _ENDPOINT: "a ZeroMQ address (tcp://HOST:PORT, ipc://PATH)",
    _DEVICE: '"auto", "cpu", "cuda" or "cuda:N"',
}


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How one worker runs its model: weights, dtype, device, KV pool and batching limits."""

    model: str = "mell-tiny"  # a checkpoint directory, or "mell-tiny" for the built-in model
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Device = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    attention_backend: Literal["auto", "torch", "flashinfer"] = "auto"
    block_size: PositiveCount = 16  # tokens per KV block (page)
    # KV pool size in blocks (per layer). 0: from kv_cache_memory_bytes; if that is 0 too, 85%
    # of the free CUDA memory after loading the weights, or on CPU enough for max_num_seqs
    # requests of max_model_len tokens, at most 1 GiB. max_model_len is capped to the pool.
    num_kv_blocks: Count = 0
    kv_cache_memory_bytes: Count = 0  # all layers, K and V
    max_num_seqs: PositiveCount = 64  # running requests per step
    max_num_batched_tokens: PositiveCount = 512  # chunked-prefill token budget per step
    max_model_len: Count = 0  # 0: the model's max_position_embeddings (or its sliding window)
    seed: Count = 0
    # "whole": a waiting prompt is admitted when blocks for all its tokens fit (reserved at
    # once); "chunk": blocks for its first chunk only (the old rule: a long prompt can run out
    # of blocks half way and be preempted and recomputed).
    admission: Literal["whole", "chunk"] = "whole"
    # Automatic prefix caching: full prompt blocks are kept (hashed by content, chained) after
    # their requests end, and a new prompt's prefill skips its longest cached prefix.
    enable_prefix_caching: bool = True
    # The host KV tier (LayerKV): "off"; "swap": preemption moves a victim's KV to host memory
    # when that is cheaper than recomputing it; "layerwise": swap, and a prompt whose KV does
    # not fit in device blocks is prefilled layer by layer straight into host blocks, parked
    # there and reloaded when device blocks free up.
    kv_offload: Literal["off", "swap", "layerwise"] = "off"
    host_kv_bytes: Count = 0  # host tier size, all layers (pinned on CUDA); needed unless "off"
    # Benchmarks: the CPU copy engine paces copies to this many bytes/s (0: as fast as memcpy).
    # Also the cost model's link speed before one is measured.
    kv_link_bytes_per_s: NonNegative = 0.0
    # Tests only: park every prompt on the host after its prefill (layerwise) and swap a
    # running request out at random every few steps (swap, layerwise), seeded by `seed`.
    kv_offload_force: bool = False
    # SLO-aware admission (0: off): a prefill joins a step only while every running request's
    # time-per-output-token slack allows it, from a step-time model fitted to measured steps.
    ttft_slo_s: NonNegative = 0.0
    tpot_slo_s: NonNegative = 0.0
    # Elastic memory (eLLM; 0: off, a fixed pool): KV pool + copy staging + the activation
    # peak of each step's tokens fit in this many bytes; the KV pool shrinks for a big prefill
    # (its top swapped to the host tier or recomputed) and grows back. The pool's maximum is
    # what is left beside a step of max_num_seqs tokens (num_kv_blocks, if set, caps it).
    memory_budget_bytes: Count = 0
    # The KV pool's memory: "static" (plain tensors), "virtual" (address space reserved for the
    # maximum, memory backing only blocks in use, the freed top given back: an mmap on CPU, the
    # CUDA driver's virtual memory API on GPUs), "auto" (virtual on CPU with a memory budget).
    kv_pool: Literal["auto", "static", "virtual"] = "auto"


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The worker daemon: where its gateway is, who it is, and its engine."""

    gateway: Endpoint = "tcp://127.0.0.1:7100"
    worker_id: str = ""  # empty: derived from host name, device and pid
    data_dir: str = ".mell"  # where "mell-tiny" is created on first use
    cluster_secret_file: str = ""  # empty: DATA_DIR/cluster.secret (made by the gateway)
    data_host: str = "127.0.0.1"  # address other workers reach this worker's data port on
    data_port: Port = 0  # 0: an ephemeral port
    heartbeat_interval_s: Positive = 0.5
    load_report_interval_s: Positive = 0.25
    drain_grace_s: NonNegative = 30.0
    hello_timeout_s: Positive = 60.0  # give up (exit 1) when no gateway answers for this long
    fake_token_rate: NonNegative = 0.0  # benchmarks only: tokens at this rate, no model
    # Benchmarks only: every engine step lasts at least this long (the worker waits out the
    # rest, still receiving). CPU workers sharing fewer cores then act as devices of their own:
    # a step time flat in the batch, and no competition for cores while they wait. 0: off.
    min_step_ms: NonNegative = 0.0
    # Idle this long, with the rest of its pool able to take its load, the gateway makes the
    # worker sleep (its KV memory given back until a request comes). 0: only `mellctl sleep`.
    sleep_after_s: NonNegative = 0.0
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)


class JournalConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The gateway's event journal (DATA_DIR/journal): fsync policy, group-commit interval,
    segment size, retention, snapshots."""

    fsync: Literal["interval", "always", "never"] = "interval"
    fsync_interval_s: NonNegative = 0.02  # group commit: one fsync per interval of arrivals
    segment_bytes: PositiveCount = 64 << 20  # rotate when a segment would grow past this
    retain_segments: Count = 4  # segments older than the last snapshot that are kept
    max_pending_bytes: PositiveCount = 64 << 20  # past this, append writes and fsyncs itself
    snapshot_interval_s: NonNegative = 60.0  # a snapshot record of the view this often (0: never)
    snapshot_every_events: Count = 100_000  # ... or after this many events, whichever is first


class GatewayConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The gateway: HTTP listeners, worker endpoint, admission limits, policy, journal."""

    host: str = "127.0.0.1"
    port: Port = 8000
    worker_endpoint: Endpoint = "tcp://127.0.0.1:7100"  # workers connect here
    admin_host: str = "127.0.0.1"
    admin_port: Port = 8001
    data_dir: str = ".mell"
    cluster_secret_file: str = ""  # empty: DATA_DIR/cluster.secret, created at first start
    api_keys: list[str] = msgspec.field(default_factory=list)
    models: list[str] = msgspec.field(default_factory=lambda: ["mell-tiny"])  # dirs or mell-tiny
    max_queued_requests: PositiveCount = 1024
    request_timeout_s: Positive = 600.0
    worker_timeout_s: Positive = 3.0  # no heartbeat for this long: the worker is lost
    tokenize_inline_chars: Count = 2048  # longer prompts are tokenized in a thread pool
    policy: str = "least-loaded"
    # Place by where workers have the prompt's prefix cached (policies that can: least-loaded,
    # best-fit, worst-fit, mell); workers report their caches in their load reports.
    prefix_aware: bool = True
    epoch_s: Positive = 0.25
    # After a restart: workers of the recovered view that have not said hello by then are lost,
    # and requests that died with the old gateway are aborted on their workers.
    reconcile_timeout_s: Positive = 10.0
    journal: JournalConfig = msgspec.field(default_factory=JournalConfig)


def load_config(path: str | Path, kind: type[T]) -> T:
    """Load a TOML file into `kind`; raise ConfigError naming the file and the bad key."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    return convert_config(raw, kind, source=str(path))


def overlay(config: T, changes: dict[str, Any], *, source: str = "command line") -> T:
    """`config` with `changes` laid over it (nested dicts merge into nested structs), validated
    as a file is; a ConfigError naming `source` and the key otherwise."""
    raw = _merged(msgspec.to_builtins(config), changes)
    return convert_config(raw, type(config), source=source)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def convert_config(raw: dict[str, Any], kind: type[T], *, source: str) -> T:
    """Convert already-parsed data into `kind`; errors name `source` and the key path."""
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError as err:
        raise ConfigError(f"{source}: {_readable(str(err))}") from None


def _readable(msg: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.engine.block_size`"; name the key plainly.
    for pattern, name in _PATTERN_NAMES.items():
        msg = msg.replace(f"Expected `str` matching regex {pattern!r}", f"expected {name}")
    if " - at `$." in msg:
        what, _, where = msg.partition(" - at `$.")
        return f"key {where.rstrip('`')!r}: {what}"
    return msg
