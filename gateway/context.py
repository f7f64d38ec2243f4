"""Everything a gateway handler may need, built once at start and stored in the app."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from mell.common.config import GatewayConfig
from mell.gateway.cluster_state import ClusterState
from mell.gateway.dispatcher import Dispatcher
from mell.gateway.event_feed import EventFeed
from mell.gateway.metrics import Metrics
from mell.gateway.migrator import Migrator
from mell.gateway.models import ModelRegistry
from mell.gateway.policy.base import Policy
from mell.gateway.recovery import JournalKeeper
from mell.gateway.worker_link import WorkerLink


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
