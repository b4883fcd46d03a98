"""`cluster.yaml` passes the validation `ray up` applies (Ray's autoscaler schema, after Ray fills
in the provider defaults) and keeps the properties the factory relies on: elastic GPU workers,
spot capacity available, setup from the lock, and secure defaults (token auth, SSH only, no
credentials)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from core.settings.run import REPO_ROOT

CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
# GPUs of the AWS instance types a worker type may use (the autoscaler detects them at `ray up`).
AWS_GPUS = {
    "g5.xlarge": 1, "g5.2xlarge": 1, "g5.4xlarge": 1, "g5.8xlarge": 1, "g5.12xlarge": 4,
    "g5.48xlarge": 8, "g6.xlarge": 1, "g6.2xlarge": 1, "g6.48xlarge": 8,
    "p4d.24xlarge": 8, "p4de.24xlarge": 8, "p5.48xlarge": 8,
}  # fmt: skip
CREDENTIAL_PATTERNS = {
    "AWS access key id": r"\b(AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret key": r"aws_secret_access_key|aws_session_token",
    "provider credentials": r"aws_credentials|credentials:",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{20,}\b",
    "inline Ray token": r"RAY_AUTH_TOKEN=",
    "password": r"password",
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _workers(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = config["available_node_types"]
    return {name: spec for name, spec in types.items() if name != config["head_node_type"]}


def _commands(config: dict[str, Any], key: str) -> str:
    return "\n".join(config.get(key, []))


def _exported(command: str) -> dict[str, str]:
    """VAR=value pairs of a shell command (after `export` or as prefixes)."""
    return dict(word.split("=", 1) for word in shlex.split(command.replace(";", " ")) if re.match(r"^[A-Z_]+=", word))


def test_validates_with_rays_autoscaler_schema(config: dict[str, Any]) -> None:
    validate_config(copy.deepcopy(config))  # the file as written
    # What `ray up` validates: the config merged with the provider's defaults.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    assert prepared["available_node_types"].keys() == config["available_node_types"].keys()
    assert prepared["provider"]["type"] == "aws"


def test_gpu_workers_scale_from_zero(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head is for the GCS, autoscaler and drivers only"
    assert AWS_GPUS.get(head["node_config"]["InstanceType"], 0) == 0
    assert "--num-cpus=0" in _commands(config, "head_start_ray_commands")

    workers = _workers(config)
    gpus = {name: AWS_GPUS[spec["node_config"]["InstanceType"]] for name, spec in workers.items()}
    assert 1 in gpus.values() and 8 in gpus.values(), gpus
    for name, spec in workers.items():
        assert spec["min_workers"] == 0, name
        assert spec["max_workers"] > 0, name
    assert config["max_workers"] >= max(spec["max_workers"] for spec in workers.values())
    # The docs' GPU count (every node type at its max) must be reachable under the global cap.
    assert config["max_workers"] == sum(spec["max_workers"] for spec in workers.values())
    total_gpus = sum(spec["max_workers"] * gpus[name] for name, spec in workers.items())
    assert f"= {total_gpus} GPUs" in (REPO_ROOT / "docs" / "cluster.md").read_text()
    assert config["idle_timeout_minutes"] > 0


def test_spot_capacity_is_an_option(config: dict[str, Any]) -> None:
    spot = [
        name for name, spec in _workers(config).items()
        if spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    ]  # fmt: skip
    on_demand = [name for name in _workers(config) if name not in spot]
    assert spot and on_demand


def test_nodes_are_set_up_from_the_lock_with_a_cache_for_models(config: dict[str, Any]) -> None:
    setup = _commands(config, "setup_commands")
    assert "pip install" in setup and "uv" in setup
    assert "uv sync --locked" in setup
    assert "." in config["file_mounts"].values(), "the repository (with uv.lock) is mounted on every node"
    assert ".gitignore" in config["rsync_filter"] and ".venv" in config["rsync_exclude"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        env = _exported(config[key][-1])
        assert env.get("HF_HOME"), key
        assert env.get("UV_PROJECT_ENVIRONMENT"), key


def test_token_authentication_with_a_mounted_token(config: dict[str, Any]) -> None:
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        env = _exported(config[key][-1])
        assert env["RAY_AUTH_MODE"] == "token", key
        token_path = env["RAY_AUTH_TOKEN_PATH"].replace("$HOME", "~")
        assert token_path in config["file_mounts"], f"{key}: the token at {token_path} is not mounted"
        local = config["file_mounts"][token_path]
        assert not Path(local).expanduser().is_relative_to(REPO_ROOT), "the token must not live in the repository"


def test_only_ssh_is_opened_and_the_dashboard_stays_on_loopback(config: dict[str, Any]) -> None:
    security_group = config["provider"]["security_group"]
    for rule in security_group.get("IpPermissions", []):
        assert rule.get("FromPort") == rule.get("ToPort") == 22, rule
    for name, spec in config["available_node_types"].items():
        # A SecurityGroupIds of one's own would bypass the group above.
        assert "SecurityGroupIds" not in spec["node_config"], name
        for interface in spec["node_config"].get("NetworkInterfaces", []):
            assert "Groups" not in interface, name
    head_start = _commands(config, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_start
    everything = "\n".join(_commands(config, key) for key in config if key.endswith("commands"))
    assert "0.0.0.0" not in everything


def test_no_credentials_in_the_file() -> None:
    text = CLUSTER_YAML.read_text()
    for what, pattern in CREDENTIAL_PATTERNS.items():
        assert not re.search(pattern, text, flags=re.IGNORECASE), f"{what} in cluster.yaml"
