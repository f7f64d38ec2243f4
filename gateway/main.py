"""`mell-gateway`: the HTTP front door and cluster scheduler, on uvloop + aiohttp.

    mell-gateway [--config FILE] [--port P] [--worker-endpoint tcp://HOST:PORT] [--model SPEC]...

Port 0 picks a free port. Once listening it prints one JSON line on stdout with the actual
addresses, {"http": "http://HOST:PORT", "workers": "tcp://HOST:PORT"}, for launchers such as
`mellctl up`, and tells systemd READY=1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import msgspec
import structlog
import uvloop
from aiohttp import web

from mell.common.config import GatewayConfig, load_config
from mell.common.errors import MellError
from mell.common.logging import configure_logging
from mell.common.notify import Notifier
from mell.gateway.app import build_app
from mell.gateway.cluster_state import ClusterState
from mell.gateway.cluster_view import ClusterView
from mell.gateway.context import GatewayContext
from mell.gateway.dispatcher import Dispatcher
from mell.gateway.metrics import Metrics
from mell.gateway.models import ModelRegistry, ServedModel
from mell.gateway.policy.base import make_policy
from mell.gateway.worker_link import WorkerLink

log = structlog.get_logger("mell.gateway")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mell-gateway", description="Run the mell gateway.")
    p.add_argument("--config", help="gateway TOML file (flags override it)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="HTTP port (0: a free one)")
    p.add_argument("--worker-endpoint", help="ZeroMQ address workers connect to")
    p.add_argument("--model", action="append", help='model spec (dir or "mell-tiny"); repeat')
    p.add_argument("--data-dir")
    p.add_argument("--policy", help="placement policy (least-loaded, mell, ...)")
    p.add_argument("--api-key", action="append", help="accepted API key; repeat")
    p.add_argument("--max-queued-requests", type=int)
    p.add_argument(
        "--worker-timeout", type=float, help="seconds of silence before a worker is lost"
    )
    p.add_argument("--log-level", default="info")
    return p


def make_config(args: argparse.Namespace) -> GatewayConfig:
    config = load_config(args.config, GatewayConfig) if args.config else GatewayConfig()
    flags = {
        "host": args.host,
        "port": args.port,
        "worker_endpoint": args.worker_endpoint,
        "models": args.model,
        "data_dir": args.data_dir,
        "policy": args.policy,
        "api_keys": args.api_key,
        "max_queued_requests": args.max_queued_requests,
        "worker_timeout_s": args.worker_timeout,
    }
    return msgspec.structs.replace(config, **{k: v for k, v in flags.items() if v is not None})


def build_context(config: GatewayConfig) -> GatewayContext:
    models = ModelRegistry(
        [ServedModel.load(spec, config.data_dir) for spec in config.models],
        inline_chars=config.tokenize_inline_chars,
    )
    state = ClusterState(ClusterView(models.names()))
    link = WorkerLink(config, state, config.worker_endpoint)
    policy = make_policy(config.policy)
    metrics = Metrics(state.view)
    dispatcher = Dispatcher(state, policy, link.send, metrics, config.max_queued_requests)
    link.dispatcher = dispatcher
    return GatewayContext(config, models, state, link, dispatcher, metrics, policy)


async def serve(config: GatewayConfig) -> None:
    ctx = build_context(config)
    runner = web.AppRunner(build_app(ctx), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://{config.host}:{port}"
    print(json.dumps({"http": url, "workers": ctx.link.endpoint}), flush=True)
    log.info(
        "gateway_started",
        url=url,
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
    await runner.cleanup()
    ctx.link.close()
    ctx.models.close()


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
    except MellError as err:
        print(f"mell-gateway: {err.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
