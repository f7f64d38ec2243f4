"""The workers' host KV tier (LayerKV) and the SLO-aware admission rule, in the simulator.

What it models (`workerd/engine/scheduler.py` is the real thing), at epoch granularity:
- a preempted request whose prefill is done is *swapped*: its KV goes to the worker's host tier
  (if it has room) instead of being dropped, and when it fits on the device again it is
  reloaded (the reload's transfer at the host link speed delays its next token) instead of
  re-prefilling its context;
- with "layerwise", a preempted request still prefilling is *parked*: its prompt is prefilled
  in one pass straight to the host (its first token after that pass, `prefill_ms` of what was
  left, alone: the pass's share of the worker's time is not charged to its neighbours), then it
  waits on the host and is reloaded like a swapped one;
- with no room on the host, the victim is recomputed as before;
- `tpot_slo_s` > 0: a prefill chunk joins a step only while the step stays within the TPOT SLO
  (`batching.PrefillQueues`), at least one token per step.

A request on the host holds no device KV: the view (and so every policy, MELL included) sees
only device KV, as the workers' load reports do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mell.common.errors import InvalidRequest
from mell.gateway.sim.profile import Profile

OFFLOAD_MODES = ("off", "swap", "layerwise")
DEFAULT_HOST_LINK_GBPS = 25.0  # a PCIe 4.0 x16 link, effective


@dataclass(frozen=True, slots=True)
class HostTierSpec:
    """The host tier of every worker, as `mellctl simulate` flags give it."""

    kv_offload: str = "off"
    host_kv_bytes: int = 0  # per worker
    link_gbps: float = DEFAULT_HOST_LINK_GBPS  # device <-> host, GB/s
    tpot_slo_s: float = 0.0  # the admission rule (0: off)

    def check(self) -> HostTierSpec:
        """Return self, or raise InvalidRequest naming the flag."""
        if self.kv_offload not in OFFLOAD_MODES:
            raise InvalidRequest(
                f"--kv-offload {self.kv_offload!r}: one of {', '.join(OFFLOAD_MODES)}"
            )
        if self.kv_offload != "off" and self.host_kv_bytes <= 0:
            raise InvalidRequest(f"--kv-offload {self.kv_offload} needs --host-kv-bytes > 0")
        if self.host_kv_bytes < 0 or not self.link_gbps > 0 or not self.tpot_slo_s >= 0:
            raise InvalidRequest(
                "--host-kv-bytes and --tpot-slo-s must be >= 0, --host-link-gbps positive"
            )
        return self


@dataclass(slots=True)
class HostTier:
    """Per worker, the host blocks in use; which requests wait there; what moved."""

    spec: HostTierSpec
    profile: Profile
    used: dict[str, int] = field(default_factory=dict)  # worker -> host blocks in use
    on_host: dict[int, int] = field(default_factory=dict)  # request -> its host blocks
    swaps: int = 0
    parks: int = 0
    bytes_moved: int = 0  # both directions

    @property
    def capacity_blocks(self) -> int:
        p = self.profile
        return self.spec.host_kv_bytes // (p.model.kv_bytes_per_token * p.block_size)

    def take(self, wid: str, i: int, blocks: int, prefilling: bool) -> str | None:
        """A preempted request's KV goes to the host: "swap" (its prefill done), "park"
        (layerwise, still prefilling), or None (recompute: no room, or the mode does not)."""
        if prefilling and self.spec.kv_offload != "layerwise":
            return None
        if self.used.get(wid, 0) + blocks > self.capacity_blocks:
            return None
        self.used[wid] = self.used.get(wid, 0) + blocks
        self.on_host[i] = blocks
        self.bytes_moved += self._bytes(blocks)
        if prefilling:
            self.parks += 1
            return "park"
        self.swaps += 1
        return "swap"

    def reload(self, wid: str, i: int) -> float:
        """Request i comes back to the device: seconds its reload takes."""
        blocks = self.on_host.pop(i)
        self.used[wid] -= blocks
        nbytes = self._bytes(blocks)
        self.bytes_moved += nbytes
        return nbytes / (self.spec.link_gbps * 1e9)

    def _bytes(self, blocks: int) -> int:
        return blocks * self.profile.block_size * self.profile.model.kv_bytes_per_token
