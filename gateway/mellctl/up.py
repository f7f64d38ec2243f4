"""`mellctl up`: a gateway and N workers on this machine, in the foreground.

    mellctl up [--workers N] [--model DIR|mell-tiny]... [--port P] [--data-dir D] [--policy NAME]

Creates mell-tiny on first use, starts the gateway, then the workers (split across the models),
prints one line with the URL once /health says every model is served and every worker is active,
then one line with the admin API's URL (its token is DATA_DIR/admin.token), and stops every
child on Ctrl-C or SIGTERM. If a child does not start, it exits 1 naming that child and its log
file.
The gateway creates the cluster secret DATA_DIR/cluster.secret at its first start; the workers
are given it (--cluster-secret-file). Children log to DATA_DIR/logs/; the pids and URLs are in
DATA_DIR/up.json. While it serves, `mellctl` finds it from any directory (`running.py`);
`--data-dir D` names it explicitly.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mell.common.errors import MellError
from mell.common.model_spec import TINY, model_name, resolve_model_dir
from mell.gateway.mellctl import running
from mell.transport.secret import SECRET_FILE


class StartFailed(MellError):
    """A child process of `mellctl up` did not start."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("up", help="run a local cluster: a gateway and N workers")
    p.add_argument("--workers", type=int, default=1, help="number of workers (default 1)")
    p.add_argument("--model", action="append", help='"mell-tiny" or a checkpoint dir; repeat')
    p.add_argument("--port", type=int, default=0, help="HTTP port (default: a free one)")
    p.add_argument("--admin-port", type=int, default=0, help="admin port (default: a free one)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--data-dir", default=".mell", help="state, logs and mell-tiny (.mell)")
    p.add_argument("--policy", default="least-loaded", help="placement policy")
    p.add_argument("--device", default="auto", help="worker device (auto, cpu, cuda)")
    p.add_argument("--api-key", action="append", help="require this API key; repeat")
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks per worker (default: memory)")
    p.add_argument("--host-kv-bytes", type=int, help="host KV tier per worker (with --kv-offload)")
    p.add_argument("--kv-offload", choices=["off", "swap", "layerwise"], help="host KV tier use")
    p.add_argument(
        "--memory-budget-bytes",
        type=int,
        action="append",
        help="elastic memory per worker (KV + activations); repeat: one per worker, in order",
    )
    p.add_argument(
        "--device-memory-bytes",
        type=int,
        default=0,
        help="what the workers sharing the device may use together (their budgets must fit)",
    )
    p.add_argument("--no-prefix-caching", action="store_true", help="workers keep no prefix cache")
    p.add_argument("--fake-token-rate", type=float, help="benchmarks only: workers without model")
    p.add_argument(
        "--min-step-ms", type=float, help="benchmarks only: workers' steps last at least this long"
    )
    p.add_argument("--worker-timeout", type=float, help="seconds of silence: worker lost")
    p.add_argument(
        "--sleep-after", type=float, help="idle seconds before a worker not needed sleeps"
    )
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--verbose", action="store_true", help="children log to this terminal")
    p.set_defaults(func=run)


def _worker_budget(args: argparse.Namespace, index: int) -> int:
    """Worker `index`'s memory budget: its own --memory-budget-bytes, or the only one given
    (0: none)."""
    budgets = args.memory_budget_bytes or []
    if len(budgets) == 1:
        return int(budgets[0])
    return int(budgets[index]) if index < len(budgets) else 0


def _check_budgets(args: argparse.Namespace) -> None:
    """Budgets are one per worker (or one for all), none negative, and together within
    --device-memory-bytes when it is given (workers sharing one device)."""
    budgets = args.memory_budget_bytes or []
    if len(budgets) > 1 and len(budgets) != args.workers:
        raise StartFailed(
            f"--memory-budget-bytes given {len(budgets)} times for {args.workers} workers "
            "(give it once, or once per worker)"
        )
    if any(b < 0 for b in budgets):
        raise StartFailed("--memory-budget-bytes must be >= 0")
    total = sum(_worker_budget(args, i) for i in range(args.workers))
    if args.device_memory_bytes and total > args.device_memory_bytes:
        raise StartFailed(
            f"the workers' memory budgets ({total} bytes together) exceed "
            f"--device-memory-bytes {args.device_memory_bytes}"
        )


def run(args: argparse.Namespace) -> int:
    specs = args.model or [TINY]
    if args.workers < len(specs):
        raise StartFailed(f"--workers {args.workers} cannot serve {len(specs)} models")
    _check_budgets(args)
    data_dir = Path(args.data_dir).expanduser().resolve()
    (data_dir / "logs").mkdir(parents=True, exist_ok=True)
    specs = [spec if spec == TINY else str(resolve_model_dir(spec, data_dir)) for spec in specs]
    if TINY in specs:
        resolve_model_dir(TINY, data_dir)  # create it once, before any child reads it
    cluster = Cluster(args, data_dir, specs)
    stop = _install_stop_handlers()
    try:
        url = cluster.start(args.startup_timeout, stop)
        running.record(data_dir)
        names = ", ".join(model_name(s) for s in specs)
        print(f"mell is serving {names} at {url} with {args.workers} worker(s)", flush=True)
        # stdout carries exactly the one ready line; the admin hint goes to stderr
        print(
            f"admin API at {cluster.admin_url} (`mellctl status` finds it from any directory)",
            file=sys.stderr,
            flush=True,
        )
        return cluster.wait(stop)
    finally:
        running.forget()
        cluster.stop()


def _install_stop_handlers() -> list[int]:
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop.append(signum))
    return stop


class Cluster:
    def __init__(self, args: argparse.Namespace, data_dir: Path, specs: list[str]) -> None:
        self.args = args
        self.data_dir = data_dir
        self.specs = specs
        self.children: list[Child] = []
        self.admin_url = ""

    def start(self, timeout_s: float, stop: list[int]) -> str:
        deadline = time.monotonic() + timeout_s
        gateway = self._spawn("gateway", self._gateway_cmd(), capture_stdout=True)
        addresses = self._read_addresses(gateway, deadline)
        self.admin_url = addresses.get("admin", "")
        for i in range(self.args.workers):
            spec = self.specs[i % len(self.specs)]
            self._spawn(f"worker w{i}", self._worker_cmd(f"w{i}", spec, addresses["workers"]))
        self._write_state(addresses["http"])
        self._wait_healthy(addresses["http"], deadline, stop)
        return addresses["http"]

    def wait(self, stop: list[int]) -> int:
        """Until Ctrl-C/SIGTERM (exit 0) or the gateway dies (exit 1)."""
        reported: set[str] = set()
        while not stop:
            time.sleep(0.2)
            for child in self.children:
                code = child.proc.poll()
                if code is None or child.name in reported:
                    continue
                reported.add(child.name)
                print(
                    f"mellctl: {child.name} exited with code {code}; log: {child.log_path}",
                    file=sys.stderr,
                )
                if child.name == "gateway":
                    return 1
        return 0

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM every child (workers first), then SIGKILL what is left after the grace."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    # ------------------------------------------------------------ helpers

    def _gateway_cmd(self) -> list[str]:
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "mell.gateway.main",
            "--host",
            a.host,
            "--port",
            str(a.port),
            "--admin-port",
            str(a.admin_port),
            "--worker-endpoint",
            "tcp://127.0.0.1:0",
            "--data-dir",
            str(self.data_dir),
            "--policy",
            a.policy,
        ]
        for spec in self.specs:
            cmd += ["--model", spec]
        for key in a.api_key or []:
            cmd += ["--api-key", key]
        if a.worker_timeout:
            cmd += ["--worker-timeout", str(a.worker_timeout)]
        return cmd

    def _worker_cmd(self, worker_id: str, spec: str, endpoint: str) -> list[str]:
        a = self.args
        cmd = [
            sys.executable,
            "-m",
            "mell.workerd.main",
            "--gateway",
            endpoint,
            "--model",
            spec,
            "--worker-id",
            worker_id,
            "--data-dir",
            str(self.data_dir),
            "--cluster-secret-file",
            str(self.data_dir / SECRET_FILE),
            "--device",
            a.device,
        ]
        if a.fake_token_rate:
            cmd += ["--fake-token-rate", str(a.fake_token_rate)]
        if a.num_kv_blocks:
            cmd += ["--num-kv-blocks", str(a.num_kv_blocks)]
        if a.min_step_ms:
            cmd += ["--min-step-ms", str(a.min_step_ms)]
        if a.host_kv_bytes:
            cmd += ["--host-kv-bytes", str(a.host_kv_bytes)]
        if a.kv_offload:
            cmd += ["--kv-offload", a.kv_offload]
        if a.no_prefix_caching:
            cmd.append("--no-prefix-caching")
        if a.sleep_after:
            cmd += ["--sleep-after", str(a.sleep_after)]
        budget = _worker_budget(a, int(worker_id[1:]))
        if budget:
            cmd += ["--memory-budget-bytes", str(budget)]
        return cmd

    def _spawn(self, name: str, cmd: list[str], capture_stdout: bool = False) -> Child:
        log_path = self.data_dir / "logs" / f"{name.replace(' ', '-')}.log"
        log_file = None if self.args.verbose else open(log_path, "ab")  # noqa: SIM115
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.args.workers)))
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if capture_stdout else subprocess.DEVNULL,
            stderr=log_file,
            env=env,
        )
        if log_file is not None:
            log_file.close()
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def _read_addresses(self, gateway: Child, deadline: float) -> dict[str, str]:
        stdout = gateway.proc.stdout
        assert stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([stdout], [], [], 0.2)
            if ready:
                line = stdout.readline()
                if line:
                    return json.loads(line)
            if gateway.proc.poll() is not None:
                raise self._failed(gateway)
        raise StartFailed(f"gateway did not start in time; log: {gateway.log_path}")

    def _wait_healthy(self, url: str, deadline: float, stop: list[int]) -> None:
        while time.monotonic() < deadline and not stop:
            for child in self.children:
                if child.proc.poll() is not None:
                    raise self._failed(child)
            if _healthy(url, self.args.workers):
                return
            time.sleep(0.1)
        if stop:
            raise KeyboardInterrupt
        raise StartFailed(
            f"cluster not healthy after {self.args.startup_timeout} s; "
            f"logs: {self.data_dir / 'logs'}"
        )

    def _failed(self, child: Child) -> StartFailed:
        said = _last_error_line(child.log_path)
        return StartFailed(
            f"{child.name} (pid {child.proc.pid}) exited with code "
            f"{child.proc.returncode} while starting{': ' + said if said else ''}; "
            f"log: {child.log_path}"
        )

    def _write_state(self, url: str) -> None:
        state = {
            "url": url,
            "admin_url": self.admin_url,
            "mellctl_pid": os.getpid(),
            "children": [{"name": c.name, "pid": c.proc.pid} for c in self.children],
        }
        (self.data_dir / "up.json").write_text(json.dumps(state, indent=1))


def _last_error_line(log_path: Path) -> str:
    """The one-line error a child prints before it exits ("mell-gateway: ..."), if any."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()[-20:]
    except OSError:
        return ""
    said = [line for line in lines if line.startswith(("mell-gateway: ", "mell-workerd: "))]
    return said[-1].split(": ", 1)[1] if said else ""


def _healthy(url: str, num_workers: int) -> bool:
    """Every model served and every worker active."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1.0) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return sum(m.get("active", 0) for m in body.get("models", {}).values()) >= num_workers
