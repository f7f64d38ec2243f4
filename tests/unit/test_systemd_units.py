"""The unit files pass `systemd-analyze verify` with no warning about them at all.

verify exits 0 on unknown keys and unparsable values (it only warns), so any stderr line that
names one of our units fails the test. The ExecStart binaries (/opt/mell/.venv/bin/...) do not
exist here; the copies under test point them at /bin/true, which changes nothing else.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
VENV_BIN = "/opt/mell/.venv/bin/"
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def _copies(tmp_path: Path) -> list[Path]:
    """The units as installed: the template as instance @0, binaries pointed at /bin/true."""
    out = []
    for unit in sorted(UNITS.glob("*.service")) + sorted(UNITS.glob("*.target")):
        name = unit.name.replace("@.service", "@0.service")
        text = re.sub(re.escape(VENV_BIN) + r"[\w-]+", "/bin/true", unit.read_text())
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def _verify(units: list[Path]) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", *[f"./{u.name}" for u in units]],
        cwd=units[0].parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_units_exist() -> None:
    names = {p.name for p in UNITS.iterdir()}
    assert {"mell-gateway.service", "mell-workerd@.service", "mell.target"} <= names


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    units = _copies(tmp_path)
    result = _verify(units)
    ours = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(u.name in line for u in units) or "mell" in line
    ]
    assert result.returncode == 0, result.stderr
    assert not ours, "\n".join(ours)


def test_the_check_catches_a_warning(tmp_path: Path) -> None:
    units = _copies(tmp_path)
    target = next(u for u in units if u.suffix == ".target")
    target.write_text(target.read_text() + "Bogus=1\n")
    result = _verify(units)
    assert result.returncode == 0  # why the test reads stderr, not only the exit code
    assert any(target.name in line for line in result.stderr.splitlines())


def test_worker_instance_is_its_device() -> None:
    text = (UNITS / "mell-workerd@.service").read_text()
    assert "Environment=MELL_DEVICE=cuda:%i" in text
    assert "--instance %i --device ${MELL_DEVICE}" in text
    assert "EnvironmentFile=-/etc/mell/workerd-%i.env" in text
    settings = [line for line in text.splitlines() if not line.startswith("#")]
    assert not [line for line in settings if line.startswith("PrivateDevices=")]  # hides GPUs
    assert not [line for line in settings if line.startswith("MemoryDenyWriteExecute=")]  # JIT


def test_gateway_unit_essentials() -> None:
    text = (UNITS / "mell-gateway.service").read_text()
    for line in ("Type=notify", "Restart=on-failure", "StateDirectory=mell"):
        assert line in text.splitlines()
    assert re.search(r"^WatchdogSec=\d+$", text, re.M)


def test_units_use_the_shipped_configs() -> None:
    for unit in ("mell-gateway.service", "mell-workerd@.service"):
        for path in re.findall(r"--config /etc/mell/(\S+)", (UNITS / unit).read_text()):
            assert (ROOT / "configs" / path).is_file(), path
    assert (UNITS / "mell.env").is_file()
