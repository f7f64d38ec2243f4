"""`mell-workerd`: one engine on one device, connected to a gateway by address.

    mell-workerd --gateway tcp://HOST:PORT --model DIR|mell-tiny [--device cuda:0] ...

The cluster secret is read from --cluster-secret-file (default DATA_DIR/cluster.secret, the
file the gateway creates in its data dir; systemd passes it as a credential).

Exit codes: 0 after a drain (SIGTERM), 1 on a fatal error, 2 on bad flags or config, or when
the gateway refuses this worker (a wrong cluster secret, or its worker id is held by a live
worker).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

import msgspec
import structlog

from mell.common.config import WorkerConfig, load_config, overlay
from mell.common.errors import ConfigError, MellError
from mell.common.logging import configure_logging, log_level
from mell.common.model_spec import model_name, resolve_model_dir
from mell.common.notify import Notifier
from mell.workerd.engine.contract import ServingEngine

log = structlog.get_logger("mell.workerd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mell-workerd", description="Run one mell worker.")
    p.add_argument("--config", help="worker TOML file (flags override it)")
    p.add_argument("--gateway", help="gateway worker endpoint, e.g. tcp://127.0.0.1:7100")
    p.add_argument("--model", help='checkpoint directory or "mell-tiny"')
    p.add_argument("--device", help='"auto", "cpu", "cuda" or "cuda:N"')
    p.add_argument("--instance", help="systemd instance: the device index (cuda:N when numeric)")
    p.add_argument("--worker-id", help="unique worker id (default: host name and pid)")
    p.add_argument("--data-dir", help="where mell-tiny is created on first use")
    p.add_argument(
        "--cluster-secret-file", help="the cluster secret (default DATA_DIR/cluster.secret)"
    )
    p.add_argument("--data-host", help="address peers reach this worker's data plane on")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks (0: from memory)")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--host-kv-bytes", type=int, help="host KV tier size in bytes (LayerKV)")
    p.add_argument(
        "--kv-offload", choices=["off", "swap", "layerwise"], help="what the host KV tier is for"
    )
    p.add_argument("--max-model-len", type=int, help="context length limit")
    p.add_argument(
        "--memory-budget-bytes",
        type=int,
        help="elastic memory: KV + staging + activations fit in this (0: a fixed KV pool)",
    )
    p.add_argument(
        "--kv-pool", choices=["auto", "static", "virtual"], help="KV pool memory (virtual: VMM)"
    )
    p.add_argument(
        "--prefix-caching",
        dest="enable_prefix_caching",
        action=argparse.BooleanOptionalAction,
        help="automatic prefix caching (default on)",
    )
    p.add_argument("--drain-grace", type=float, help="seconds SIGTERM waits for requests")
    p.add_argument(
        "--sleep-after", type=float, help="idle seconds before sleeping when not needed (0: off)"
    )
    p.add_argument(
        "--fake-token-rate",
        type=float,
        help="benchmarks only: emit tokens at this rate (per request/s), no model",
    )
    p.add_argument(
        "--min-step-ms",
        type=float,
        help="benchmarks only: every engine step lasts at least this long (device emulation)",
    )
    p.add_argument("--log-level", default="info", type=log_level)
    return p


def make_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker config: the file (if any) with the flags laid over it."""
    config = load_config(args.config, WorkerConfig) if args.config else WorkerConfig()
    top = _given(
        args,
        gateway="gateway",
        worker_id="worker_id",
        data_dir="data_dir",
        cluster_secret_file="cluster_secret_file",
        data_host="data_host",
        drain_grace_s="drain_grace",
        sleep_after_s="sleep_after",
        fake_token_rate="fake_token_rate",
        min_step_ms="min_step_ms",
    )
    device = args.device or (_instance_device(args.instance) if args.instance else None)
    engine = _given(
        args,
        model="model",
        num_kv_blocks="num_kv_blocks",
        block_size="block_size",
        max_model_len="max_model_len",
        host_kv_bytes="host_kv_bytes",
        kv_offload="kv_offload",
        memory_budget_bytes="memory_budget_bytes",
        kv_pool="kv_pool",
        enable_prefix_caching="enable_prefix_caching",
    )
    if device:
        engine["device"] = device
    config = overlay(config, {**top, "engine": engine})
    if not config.worker_id:
        suffix = args.instance if args.instance else str(os.getpid())
        config = msgspec.structs.replace(config, worker_id=f"{socket.gethostname()}-{suffix}")
    return config


def _given(args: argparse.Namespace, **names: str) -> dict[str, Any]:
    return {
        key: getattr(args, flag) for key, flag in names.items() if getattr(args, flag) is not None
    }


def _instance_device(instance: str) -> str:
    return f"cuda:{instance}" if instance.isdigit() else instance


def build_engine(config: WorkerConfig) -> ServingEngine:
    """The engine for this worker, its model directory already resolved."""
    model_dir = resolve_model_dir(config.engine.model, config.data_dir)
    engine_config = msgspec.structs.replace(config.engine, model=str(model_dir))
    if config.fake_token_rate > 0:
        from mell.workerd.engine.fake_engine import FakeEngine

        return FakeEngine(engine_config, config.fake_token_rate)
    from mell.workerd.engine.engine import Engine

    return Engine(engine_config)


def run(config: WorkerConfig) -> int:
    from mell.transport.secret import SECRET_FILE, ClusterSecret
    from mell.workerd.heap import keep_large_buffers
    from mell.workerd.io import WorkerIO
    from mell.workerd.worker import Worker

    structlog.contextvars.bind_contextvars(worker_id=config.worker_id)
    secret = ClusterSecret.load(
        config.cluster_secret_file or os.path.join(config.data_dir, SECRET_FILE)
    )
    heap_tuned = keep_large_buffers()
    engine = build_engine(config)
    data_endpoint = f"tcp://{config.data_host}:{config.data_port}"
    io = WorkerIO(config.gateway, config.worker_id, data_endpoint, secret)
    worker = Worker(config, engine, io, model_name(config.engine.model), Notifier())
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    signal.signal(signal.SIGINT, lambda *_: worker.request_stop())
    log.info(
        "worker_started",
        model=worker.model_name,
        gateway=config.gateway,
        capacity_blocks=engine.stats().num_total_blocks,
        fake=config.fake_token_rate > 0,
        heap_tuned=heap_tuned,
    )
    try:
        code = worker.run()
    finally:
        io.close()
    log.info("worker_exited", code=code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=args.log_level)
    try:
        config = make_config(args)
    except MellError as err:
        print(f"mell-workerd: {err.message}", file=sys.stderr)
        return 2
    try:
        return run(config)
    except ConfigError as err:
        log.error("worker_start_failed", error=err.message)
        return 2
    except MellError as err:
        log.error("worker_start_failed", error=err.message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
