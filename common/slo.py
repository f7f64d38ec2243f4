"""A request's service-level objectives: the targets the worker's SLO-aware admission rule
(LayerKV) holds it to, given per request in the HTTP body (`ttft_slo_s`, `tpot_slo_s`, a
mell extension) and carried to the worker in `AddRequest` (and along a migration)."""

from __future__ import annotations

import msgspec

from mell.common.errors import InvalidRequest

MAX_SLO_S = 3600.0


class RequestSLO(msgspec.Struct, frozen=True, array_like=True):
    """Seconds to the first token and per output token after it; 0: the worker's default
    (its `ttft_slo_s` / `tpot_slo_s`, which may be 0: none)."""

    ttft_s: float = 0.0
    tpot_s: float = 0.0

    def validate(self) -> RequestSLO:
        """Return self, or raise InvalidRequest naming the field (each in [0, MAX_SLO_S])."""
        for name, value in (("ttft_slo_s", self.ttft_s), ("tpot_slo_s", self.tpot_s)):
            if not 0.0 <= value <= MAX_SLO_S:  # (NaN too)
                raise InvalidRequest(
                    f"{name} must be in [0, {MAX_SLO_S:g}] seconds (0: the worker's default), "
                    f"got {value!r}",
                    param=name,
                )
        return self

    def ttft_or(self, default_s: float) -> float:
        return self.ttft_s or default_s

    def tpot_or(self, default_s: float) -> float:
        return self.tpot_s or default_s
