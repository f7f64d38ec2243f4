"""The shipped configs/*.toml load into their structs, and name things that exist."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mell.common.config import GatewayConfig, WorkerConfig, load_config
from mell.gateway.policy.base import policy_names

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
STRUCTS = {"gateway.toml": GatewayConfig, "workerd.toml": WorkerConfig}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_config_loads_into_its_struct(name: str) -> None:
    config = load_config(CONFIGS / name, STRUCTS[name])  # unknown keys and bad types raise
    assert isinstance(config, STRUCTS[name])


def test_every_top_level_config_is_known_or_at_least_valid_toml() -> None:
    for path in CONFIGS.glob("*.toml"):
        tomllib.loads(path.read_text())  # other configs belong to their own tests


def test_gateway_config_values() -> None:
    config = load_config(CONFIGS / "gateway.toml", GatewayConfig)
    assert config.policy in policy_names()
    assert config.data_dir == "/var/lib/mell"  # the unit's StateDirectory
    assert config.admin_host == "127.0.0.1"


def test_worker_config_points_at_the_gateway() -> None:
    gateway = load_config(CONFIGS / "gateway.toml", GatewayConfig)
    worker = load_config(CONFIGS / "workerd.toml", WorkerConfig)
    assert worker.gateway == gateway.worker_endpoint
    assert worker.engine.model in gateway.models
