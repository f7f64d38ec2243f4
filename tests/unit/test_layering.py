"""The dependency rules of ARCHITECTURE.md: common ← transport ← {gateway, workerd}; inside the
gateway, the rooms of `mell.gateway`'s docstring: cluster ← api ← admin, the wiring (context,
app, main) above; inside workerd, the block manager and the runner stay behind the engine
contract."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package -> mell packages it must not import
FORBIDDEN = {
    "common": ("mell.transport", "mell.gateway", "mell.workerd"),
    "transport": ("mell.gateway", "mell.workerd"),
    "gateway": ("mell.workerd",),
    "workerd": ("mell.gateway",),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_dependency_rule(package: str) -> None:
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


_WIRING = ("mell.gateway.app", "mell.gateway.main")
# gateway room -> mell modules it must not import (the rule in gateway/__init__.py)
ROOMS = {
    "cluster": ("mell.gateway.api", "mell.gateway.admin", "mell.gateway.context", *_WIRING),
    "api": ("mell.gateway.admin", *_WIRING),
    "admin": _WIRING,
    "policy": ("mell.gateway.cluster", "mell.gateway.api", "mell.gateway.admin"),
    "sim": ("mell.gateway.cluster", "mell.gateway.api", "mell.gateway.admin"),
    "journal": ("mell.gateway.cluster", "mell.gateway.api", "mell.gateway.admin"),
}


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_gateway_room_respects_dependency_rule(room: str) -> None:
    paths = sorted((ROOT / "gateway" / room).rglob("*.py"))
    assert paths, f"no room gateway/{room}"
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in paths
        for name in _imports(path)
        if name == "mell.gateway"
        or name.startswith(tuple(f"{m}." for m in ROOMS[room]))
        or name in ROOMS[room]
    ]
    assert not bad, bad


def test_cluster_room_serves_no_http() -> None:
    """The cluster's state and mechanisms know nothing of aiohttp (handlers live in api/admin)."""
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in (ROOT / "gateway" / "cluster").rglob("*.py")
        for n in _imports(p)
        if n.split(".")[0] == "aiohttp"
    ]
    assert not bad, bad


def test_gateway_has_no_flat_modules_but_the_wiring() -> None:
    flat = {p.stem for p in (ROOT / "gateway").glob("*.py")}
    assert flat == {"__init__", "app", "context", "main"}, flat


def test_common_and_transport_never_import_heavy_libraries() -> None:
    heavy = ("torch", "zmq", "aiohttp")
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in (ROOT / "common").rglob("*.py")
        for n in _imports(p)
        if n.split(".")[0] in heavy
    ]
    assert not bad, bad


def test_importing_the_gateway_does_not_import_torch() -> None:
    code = (
        "import sys, importlib, pkgutil, mell.gateway as g\n"
        "for m in pkgutil.walk_packages(g.__path__, 'mell.gateway.'):\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mell_packages_resolve_inside_this_repository() -> None:
    import mell.common
    import mell.transport

    assert Path(mell.common.__file__).resolve().is_relative_to(ROOT)
    assert Path(mell.transport.__file__).resolve().is_relative_to(ROOT)


# The engine's insides: only `workerd/engine/` may import them or reach for them on an engine.
ENGINE_INSIDES = ("mell.workerd.engine.block_manager", "mell.workerd.engine.runner")
ENGINE_ATTRIBUTES = {"blocks", "runner", "scheduler", "kv"}


def _engine_insides_touched(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [f"imports {n}" for n in _imports(path) if n.startswith(ENGINE_INSIDES)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "mell.workerd.engine":
            found += [
                f"imports {a.name}" for a in node.names if a.name in ("block_manager", "runner")
            ]
        if isinstance(node, ast.Attribute) and node.attr in ENGINE_ATTRIBUTES:
            found.append(f"reads .{node.attr} (line {node.lineno})")
    return found


def test_nothing_outside_the_engine_touches_the_block_manager_or_the_runner() -> None:
    engine_room = ROOT / "workerd" / "engine"
    paths = [*(ROOT / "workerd").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]
    bad = [
        f"{p.relative_to(ROOT)} {what}"
        for p in paths
        if not p.is_relative_to(engine_room)
        for what in _engine_insides_touched(p)
    ]
    assert not bad, bad


def test_the_runner_reads_blocks_from_the_batch_not_the_block_manager() -> None:
    runner = ROOT / "workerd" / "engine" / "runner.py"
    assert "mell.workerd.engine.block_manager" not in _imports(runner)
    assert "BlockManager" not in runner.read_text()


# workerd's rooms: model ← engine ← migration ← {worker, io, main}; migration sees the engine
# through its contract only.
WORKERD_ROOMS = {
    "model": ("mell.workerd.engine", "mell.workerd.migration", "mell.workerd.worker"),
    "engine": ("mell.workerd.migration", "mell.workerd.worker", "mell.workerd.io"),
    "migration": ("mell.workerd.model", "mell.workerd.worker", "mell.workerd.io"),
}


@pytest.mark.parametrize("room", sorted(WORKERD_ROOMS))
def test_workerd_rooms_respect_their_order(room: str) -> None:
    bad = []
    for path in (ROOT / "workerd" / room).rglob("*.py"):
        for name in _imports(path):
            inside_engine = name.startswith("mell.workerd.engine.")
            if name.startswith(WORKERD_ROOMS[room]) or (
                room == "migration" and inside_engine and name != "mell.workerd.engine.contract"
            ):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad
