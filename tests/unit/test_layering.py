"""The dependency rules: common ← transport ← {gateway, workerd}; inside the gateway, the rooms
of `mell.gateway`'s docstring: cluster ← api ← admin, the wiring (context, app, main) above."""

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
