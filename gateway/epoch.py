"""The epoch loop: every epoch the policy plans its moves from the cluster view.

Until live migration exists the moves are only logged (what the policy would do).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from mell.gateway.cluster_view import ClusterView
from mell.gateway.policy.base import Policy

log = structlog.get_logger("mell.gateway")


async def run_epochs(policy: Policy, view: ClusterView, epoch_s: float) -> None:
    while True:
        await asyncio.sleep(epoch_s)
        try:
            moves = policy.plan_epoch(view, time.monotonic())
        except Exception:
            log.exception("epoch_failed", policy=policy.name)
            continue
        if moves:
            log.info(
                "epoch_moves_planned",
                policy=policy.name,
                applied=False,
                moves=[f"{m.request_id}:{m.src}->{m.dst}:{m.kind}" for m in moves],
            )
