"""`mell-gateway`: the HTTP front door and cluster scheduler, on uvloop + aiohttp.

    mell-gateway [--config FILE] [--port P] [--worker-endpoint tcp://HOST:PORT] [--model SPEC]...
                 [--admin-port P] [--data-dir DIR]

Port 0 picks a free port. At start it opens DATA_DIR/journal and replays it into the cluster
view (see `recovery`); a corrupt record stops it with exit code 3 and one line naming the segment
and offset. Once listening it prints one JSON line on stdout with the actual addresses,
{"http": "http://HOST:PORT", "admin": "http://HOST:PORT", "workers": "tcp://HOST:PORT"}, for
launchers such as `mellctl up`, leaves the admin URL in DATA_DIR/admin.json (the token is in
DATA_DIR/admin.token), creates the cluster secret workers must sign with in
DATA_DIR/cluster.secret (mode 0600; --cluster-secret-file names another) if it is not there,
and tells systemd READY=1. Exit codes: 0 stopped, 1 cannot listen, 2 bad configuration,
3 journal damaged, 4 journal locked by another process.

`build_context` is the gateway's wiring: it builds every component once, in dependency order
(port, dispatcher, migrator, link), each with its collaborators in its constructor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

import structlog
import uvloop
import zmq
from aiohttp import web

from mell.common.config import GatewayConfig, load_config, overlay
from mell.common.errors import JournalError, JournalInUse, MellError
from mell.common.logging import configure_logging, log_level
from mell.common.notify import Notifier
from mell.gateway.admin.event_feed import EventFeed
from mell.gateway.admin.routes import build_admin_app
from mell.gateway.admin.token import ensure_token, write_url
from mell.gateway.api.served_models import ModelRegistry, ServedModel
from mell.gateway.app import build_app
from mell.gateway.cluster.dispatcher import Dispatcher
from mell.gateway.cluster.metrics import Metrics
from mell.gateway.cluster.migrator import Migrator
from mell.gateway.cluster.recovery import JournalKeeper, recover
from mell.gateway.cluster.state import ClusterState
from mell.gateway.cluster.worker_link import WorkerLink
from mell.gateway.cluster.worker_port import WorkerPort
from mell.gateway.context import GatewayContext
from mell.gateway.policy.base import PREFIX_AWARE_POLICIES, WorkerStatus, make_policy
from mell.transport.secret import SECRET_FILE, ClusterSecret

log = structlog.get_logger("mell.gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mell-gateway", description="Run the mell gateway.")
    p.add_argument("--config", help="gateway TOML file (flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="HTTP port (0: a free one)")
    p.add_argument("--admin-host", help="admin API address (default 127.0.0.1)")
    p.add_argument("--admin-port", type=int, help="admin API port (0: a free one)")
    p.add_argument("--worker-endpoint", help="ZeroMQ address workers connect to")
    p.add_argument("--model", action="append", help='model spec (dir or "mell-tiny"); repeat')
    p.add_argument("--data-dir")
    p.add_argument(
        "--cluster-secret-file",
        help="the secret workers sign with (default DATA_DIR/cluster.secret, made if absent)",
    )
    p.add_argument("--policy", help="placement policy (least-loaded, mell, ...)")
    p.add_argument("--api-key", action="append", help="accepted API key; repeat")
    p.add_argument("--max-queued-requests", type=int)
    p.add_argument(
        "--worker-timeout", type=float, help="seconds of silence before a worker is lost"
    )
    p.add_argument(
        "--reconcile-timeout",
        type=float,
        help="after a restart, seconds for workers to say hello again",
    )
    p.add_argument("--log-level", default="info", type=log_level)
    return p


def make_config(args: argparse.Namespace) -> GatewayConfig:
    config = load_config(args.config, GatewayConfig) if args.config else GatewayConfig()
    flags = {
        "host": args.host,
        "port": args.port,
        "admin_host": args.admin_host,
        "admin_port": args.admin_port,
        "worker_endpoint": args.worker_endpoint,
        "models": args.model,
        "data_dir": args.data_dir,
        "cluster_secret_file": args.cluster_secret_file,
        "policy": args.policy,
        "api_keys": args.api_key,
        "max_queued_requests": args.max_queued_requests,
        "worker_timeout_s": args.worker_timeout,
        "reconcile_timeout_s": args.reconcile_timeout,
    }
    return overlay(config, {k: v for k, v in flags.items() if v is not None})


def build_context(config: GatewayConfig) -> GatewayContext:
    models = ModelRegistry(
        [ServedModel.load(spec, config.data_dir) for spec in config.models],
        inline_chars=config.tokenize_inline_chars,
    )
    recovered = recover(config, models.names())
    view = recovered.view
    state = ClusterState(view)
    keeper = JournalKeeper(state, recovered.journal, config)  # appends before the fold
    feed = EventFeed(recent=recovered.recent)
    state.add_append_hook(feed.publish)
    # In dependency order: each component gets its collaborators in its constructor.
    secret_file = config.cluster_secret_file or str(Path(config.data_dir) / SECRET_FILE)
    port = WorkerPort(config.worker_endpoint, ClusterSecret.create_or_load(secret_file))
    aware = config.prefix_aware and config.policy in PREFIX_AWARE_POLICIES
    policy = make_policy(config.policy, **({"prefix_aware": True} if aware else {}))
    metrics = Metrics(view)
    dispatcher = Dispatcher(state, policy, port.send, metrics, config.max_queued_requests)
    migrator = Migrator(state, port, dispatcher, metrics, epoch_s=config.epoch_s)
    link = WorkerLink(config, state, port, dispatcher, migrator)
    known = [w.worker_id for w in view.worker_rows.values() if w.status != WorkerStatus.LOST]
    link.expect_rejoin(known, config.reconcile_timeout_s)
    log.info(
        "journal_replayed",
        events=recovered.num_events,
        from_snapshot=recovered.from_snapshot,
        workers=len(known),
        requests=len(view.requests),
    )
    return GatewayContext(
        config,
        models,
        state,
        link,
        dispatcher,
        metrics,
        policy,
        feed=feed,
        keeper=keeper,
        recovered_requests=list(view.requests),
        migrator=migrator,
    )


async def serve(config: GatewayConfig) -> None:
    ctx = build_context(config)
    runner = web.AppRunner(build_app(ctx), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://{config.host}:{port}"
    admin_app = build_admin_app(ctx, ensure_token(config.data_dir))
    admin = web.AppRunner(admin_app, access_log=None, shutdown_timeout=2.0)
    await admin.setup()
    await web.TCPSite(admin, config.admin_host, config.admin_port, reuse_address=True).start()
    admin_url = f"http://{config.admin_host}:{admin.addresses[0][1]}"
    write_url(config.data_dir, admin_url)
    print(json.dumps({"http": url, "admin": admin_url, "workers": ctx.link.endpoint}), flush=True)
    log.info(
        "gateway_started",
        url=url,
        admin=admin_url,
        workers=ctx.link.endpoint,
        models=ctx.models.names(),
        policy=config.policy,
    )
    notifier = Notifier()
    notifier.ready(f"serving on {url}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(_watchdog(notifier))
    await stop.wait()
    log.info("gateway_stopping")
    notifier.stopping()
    watchdog.cancel()
    await admin.cleanup()
    await runner.cleanup()
    ctx.link.close()
    ctx.models.close()
    if ctx.keeper is not None:
        ctx.keeper.close()


async def _watchdog(notifier: Notifier) -> None:
    if not notifier.watchdog_interval_s:
        return
    while True:
        notifier.watchdog()
        await asyncio.sleep(notifier.watchdog_interval_s / 2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level)
    try:
        config = make_config(args)
        uvloop.run(serve(config))
    except JournalInUse as err:
        print(f"mell-gateway: {err.message}", file=sys.stderr)
        return 4
    except JournalError as err:
        print(f"mell-gateway: {err.message}", file=sys.stderr)
        return 3
    except MellError as err:
        print(f"mell-gateway: {err.message}", file=sys.stderr)
        return 2
    except (OSError, zmq.ZMQError) as err:  # e.g. a port in use, an address not of this host
        print(f"mell-gateway: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
