"""Two (or more) real engines whose migration hubs talk through the real codec, in one process.

`World.step()` delivers every queued peer message (encoded and decoded like on the wire), then
steps every engine once. Outputs are gathered per request from whichever engine produced them,
so a test can compare a migrated request's tokens with an unmigrated run.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from mell.common.messages import MigratedIn, MigrationEnded, PeerMessage, StartMigration
from mell.transport.codec import Codec
from mell.workerd.engine.engine import Engine
from mell.workerd.migration.hub import MigrationHub
from mell.workerd.migration.settings import MigrationSettings


@dataclass
class Node:
    name: str
    engine: Engine
    hub: MigrationHub = field(init=False)
    gateway: list[Any] = field(default_factory=list)
    alive: bool = True


class World:
    def __init__(self, engines: dict[str, Engine], settings: MigrationSettings | None = None):
        self.codec: Codec[PeerMessage] = Codec(PeerMessage)
        self.queue: list[tuple[str, list[bytes]]] = []
        self.nodes: dict[str, Node] = {}
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.finished: dict[str, str] = {}
        self.holder: dict[str, str] = {}  # request id -> node producing its tokens
        self.seq = 0
        self.drop_to: set[str] = set()  # addresses whose messages vanish (peer killed)
        self.duplicate = False  # deliver every peer message twice
        self.mangle: Any = None  # (message, frames) -> frames: what the wire does to them
        self.io_thread = False  # KV blocks written on a thread of their own (as on a CPU worker)
        self.sent: list[Any] = []  # every peer message, in order
        for name, engine in engines.items():
            node = Node(name, engine)
            node.hub = MigrationHub(
                engine,
                _Port(self, node),
                name,
                name,
                settings,
                moved_out=lambda rid: None,
                moved_in=lambda rid, n, name=name: self.holder.__setitem__(rid, name),
            )
            self.nodes[name] = node

    def add(
        self, node: str, request_id: str, prompt: list[int], sampling: Any, slo: Any = None
    ) -> None:
        self.nodes[node].engine.add_request(request_id, prompt, sampling, slo=slo)
        self.holder[request_id] = node

    def migrate(self, request_id: str, src: str, dst: str, kind: str) -> str | None:
        self.seq += 1
        start = StartMigration(
            call_id=1,
            migration_id=f"m{self.seq}",
            request_id=request_id,
            dst_worker_id=dst,
            dst_address=dst,
            kind=kind,
        )
        return self.nodes[src].hub.start(start)

    def deliver(self) -> None:
        """Deliver what is queued now (answers they cause wait for the next round)."""
        batch, self.queue[:] = list(self.queue), []
        for to, frames in batch:
            node = self.nodes.get(to)
            if node is None or not node.alive or to in self.drop_to:
                continue
            message, raw = self.codec.decode(frames)
            if self.io_thread and _on_a_thread(node.hub.take_blocks, message, raw):
                continue  # the I/O thread took KV blocks; the rest comes after, in order
            node.hub.handle(message, raw)

    def step(self) -> None:
        self.deliver()
        for node in self.nodes.values():
            if not node.alive:
                continue
            node.hub.poll()
            for out in node.engine.step():
                got = self.tokens[out.request_id]
                assert out.first_index <= len(got), (out, len(got))
                # a token index arrives once; a repeat (after an aborted commit) must agree
                overlap = got[out.first_index :]
                assert overlap == out.new_token_ids[: len(overlap)]
                got.extend(out.new_token_ids[len(overlap) :])
                if out.finish_reason is not None:
                    self.finished[out.request_id] = out.finish_reason.value

    def run(self, limit_s: float = 20.0) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            busy = any(
                n.alive and (n.engine.has_unfinished() or n.hub.busy) for n in self.nodes.values()
            )
            if not busy and not self.queue:
                return
            self.step()
        raise AssertionError("world did not settle")

    def ended(self, node: str) -> list[MigrationEnded]:
        return [m for m in self.nodes[node].gateway if isinstance(m, MigrationEnded)]

    def migrated_in(self, node: str) -> list[MigratedIn]:
        return [m for m in self.nodes[node].gateway if isinstance(m, MigratedIn)]


class _Port:
    def __init__(self, world: World, node: Node) -> None:
        self.world, self.node = world, node

    def to_peer(self, address: str, message: Any, buffers: list[Any] | None = None) -> None:
        frames = [bytes(f) for f in self.world.codec.encode(message, buffers or [])]
        self.world.sent.append(message)
        if self.world.mangle is not None:
            frames = self.world.mangle(message, frames)
        self.world.queue.append((address, frames))
        if self.world.duplicate:
            self.world.queue.append((address, frames))

    def to_gateway(self, message: Any) -> None:
        self.node.gateway.append(message)


def _on_a_thread(fn: Any, *args: Any) -> Any:
    """`fn(*args, now)` run on a thread of its own (as a worker's I/O thread runs it)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn(*args, time.monotonic())))
    thread.start()
    thread.join()
    return out[0]
