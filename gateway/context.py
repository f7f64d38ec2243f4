"""Everything a gateway handler may need, built once at start (`main.build_context`) and stored
in the app.

Part of the wiring at the top of the gateway, not of a room: it names components of every room,
and the handlers of `api/` and `admin/` read it (the one top-level module the rooms import).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from mell.common.config import GatewayConfig
from mell.gateway.admin.event_feed import EventFeed
from mell.gateway.api.served_models import ModelRegistry
from mell.gateway.cluster.dispatcher import Dispatcher
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.migrator import Migrator
from mell.gateway.cluster.recovery import JournalKeeper
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.worker_link import WorkerLink
from mell.gateway.policy.base import Policy


@dataclass(slots=True)
class GatewayContext:
    config: GatewayConfig
    models: ModelRegistry
    state: ClusterState
    link: WorkerLink
    dispatcher: Dispatcher
    metrics: Metrics
    policy: Policy
    feed: EventFeed = field(default_factory=EventFeed)
    keeper: JournalKeeper | None = None  # the journal, when the gateway keeps one
    recovered_requests: list[str] = field(default_factory=list)  # held by the view at start
    migrator: Migrator | None = None  # runs the policy's (and mellctl's) moves


CONTEXT = web.AppKey("context", GatewayContext)
