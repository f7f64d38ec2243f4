"""Migration boundaries (MELL §V): this worker's re-prefill speed and its bandwidth to each peer.

The prefill speed is measured once at start on the real engine (a throwaway prompt); the
bandwidth is measured whenever the gateway sends `MeasurePeers` (on every membership change):
a probe frame of `PROBE_BYTES` goes to each peer's data plane and the round trip to its
`ProbeAck` gives bytes/s (best of `PROBES_PER_PEER`). Results go to the gateway as one
`BoundariesReport`, which feeds the adaptive KV-vs-tokens choice.
"""

from __future__ import annotations

import itertools
import time

import structlog

from mell.common.messages import (
    BoundariesReport,
    FrameRef,
    PeerAddress,
    Probe,
    ProbeAck,
)
from mell.common.sampling import SamplingParams
from mell.workerd.engine.contract import MigratableEngine, ServingEngine
from mell.workerd.migration.port import Port

log = structlog.get_logger("mell.workerd.boundaries")
PROBE_BYTES = 4 << 20
PROBES_PER_PEER = 2
PROBE_TIMEOUT_S = 3.0


def kv_bytes_per_token(engine: MigratableEngine) -> int:
    """K and V bytes of one token over every layer, from the engine's KV layout."""
    return engine.kv_layout.bytes_per_token


def measure_prefill_tokens_per_s(engine: ServingEngine, num_tokens: int = 256) -> float:
    """Prefill a throwaway prompt on the engine (idle, at start); tokens per second."""
    limit = engine.max_model_len - 1
    n = max(1, min(num_tokens, limit))
    request_id = "boundary-probe"
    engine.add_request(request_id, [3] * n, SamplingParams(max_tokens=1, temperature=0.0))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    engine.abort(request_id)
    return n / max(elapsed, 1e-6)


class Boundaries:
    def __init__(
        self, port: Port, self_address: str, prefill_tokens_per_s: float, kv_bytes_per_token: int
    ) -> None:
        self.port = port
        self.kv_bytes_per_token = kv_bytes_per_token
        self.self_address = self_address
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.peer_bytes_per_s: dict[str, float] = {}
        self._ids = itertools.count(1)
        self._sent: dict[int, tuple[str, float]] = {}  # probe id -> (peer id, sent at)
        self._deadline = 0.0
        self._payload = bytes(PROBE_BYTES)

    @property
    def measuring(self) -> bool:
        return bool(self._sent)

    def measure(self, peers: list[PeerAddress], now: float) -> None:
        """Probe every peer; the report goes out when all answered or at the deadline."""
        self._sent.clear()
        for peer in peers:
            if peer.data_address == self.self_address:
                continue
            for _ in range(PROBES_PER_PEER):
                probe_id = next(self._ids)
                self._sent[probe_id] = (peer.worker_id, time.perf_counter())
                ref = FrameRef(0, "uint8", [PROBE_BYTES])
                probe = Probe(probe_id=probe_id, reply_to=self.self_address, data=ref)
                self.port.to_peer(peer.data_address, probe, [self._payload])
        self._deadline = now + PROBE_TIMEOUT_S
        if not self._sent:
            self.report()

    def on_probe(self, probe: Probe) -> None:
        self.port.to_peer(probe.reply_to, ProbeAck(probe_id=probe.probe_id))

    def on_ack(self, ack: ProbeAck) -> None:
        sent = self._sent.pop(ack.probe_id, None)
        if sent is None:
            return
        peer, at = sent
        rate = PROBE_BYTES / max(time.perf_counter() - at, 1e-6)
        self.peer_bytes_per_s[peer] = max(rate, self.peer_bytes_per_s.get(peer, 0.0))
        if not self._sent:
            self.report()

    def poll(self, now: float) -> None:
        if self._sent and now > self._deadline:
            self._sent.clear()
            self.report()

    def report(self) -> None:
        log.info(
            "boundaries_measured",
            prefill_tokens_per_s=round(self.prefill_tokens_per_s),
            peer_mb_per_s={p: round(b / 1e6) for p, b in self.peer_bytes_per_s.items()},
        )
        self.port.to_gateway(
            BoundariesReport(
                prefill_tokens_per_s=self.prefill_tokens_per_s,
                peer_bytes_per_s=dict(self.peer_bytes_per_s),
                kv_bytes_per_token=self.kv_bytes_per_token,
            )
        )
