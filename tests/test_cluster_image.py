"""`cluster.yaml` and `uv.lock` agree on the GPU image: every node type starts from a pinned image,
and the NVIDIA driver that `cluster.yaml` documents for it (its `# gpu-image:` line) runs the CUDA
major the locked torch wheels were built for, on a glibc they accept. Plain files, no Ray, no cloud:
a mismatch here means `uv sync --locked` or `torch.cuda` fails on every node after `ray up`."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"
UV_LOCK = REPO_ROOT / "uv.lock"

# Minimum Linux driver branch -> newest CUDA major it runs, from NVIDIA's "CUDA Toolkit and Minimum
# Required Driver Version for CUDA Minor Version Compatibility" table (CUDA Toolkit release notes):
# CUDA 11.x needs >= 450.80.02, 12.x >= 525.60.13, 13.x >= 580.65.06.
DRIVER_MAX_CUDA: dict[int, int] = {450: 11, 525: 12, 580: 13}

# The fixed form of the statement in cluster.yaml, e.g. `# gpu-image: nvidia-driver >= 580, CUDA 13, glibc 2.39`.
STATEMENT = re.compile(
    r"^#\s*gpu-image:\s*nvidia-driver\s*>=\s*(?P<driver>\d+)\s*,"
    r"\s*CUDA\s+(?P<cuda>\d+)\s*,\s*glibc\s+(?P<glibc>\d+\.\d+)",
    re.MULTILINE | re.IGNORECASE,
)
# EC2 accepts an AMI id or a Systems Manager parameter that resolves to one at launch. Ray's own
# "latest_dlami" is not a pin: Ray swaps in its default AMI (CUDA 11.2, glibc 2.27).
PINNED_AMI = re.compile(r"^(ami-[0-9a-f]{8,}|resolve:ssm:\S+)$")
# Packages torch depends on whose version or name carries the CUDA major of the build.
CUDA_VERSIONED = {"cuda-toolkit", "cuda-bindings", "nvidia-cuda-runtime"}
CUDA_SUFFIX = re.compile(r"-cu(\d+)$")
MANYLINUX = re.compile(r"manylinux_(\d+)_(\d+)_x86_64\.whl$")


@dataclass(frozen=True)
class ImageStatement:
    driver: int  # minimum NVIDIA driver branch of the image
    cuda: int  # the CUDA major the statement says the lock needs
    glibc: tuple[int, int]


def read_statement(cluster_text: str) -> ImageStatement | None:
    match = STATEMENT.search(cluster_text)
    if match is None:
        return None
    major, minor = match["glibc"].split(".")
    return ImageStatement(int(match["driver"]), int(match["cuda"]), (int(major), int(minor)))


def max_cuda_for_driver(driver: int) -> int | None:
    """The newest CUDA major a driver branch runs (None: older than any CUDA this table knows)."""
    known = [cuda for minimum, cuda in DRIVER_MAX_CUDA.items() if driver >= minimum]
    return max(known) if known else None


def _host_image(provider: str, node_config: dict[str, Any]) -> str | None:
    """The machine image a node boots from. The NVIDIA driver lives there: a `docker:` image only
    replaces the userland (containers use the host's kernel driver), so it does not pin the driver."""
    if provider == "aws":
        image = node_config.get("ImageId")
        return image if isinstance(image, str) and PINNED_AMI.match(image) else None
    if provider == "gcp":
        disks = node_config.get("disks") or [{}]
        return disks[0].get("initializeParams", {}).get("sourceImage")
    if provider == "azure":
        arm = node_config.get("azure_arm_parameters", {})
        return arm.get("imageId") or arm.get("imageOffer")
    return None


def unpinned_node_types(config: dict[str, Any]) -> list[str]:
    """Node types without a pinned image: a cloud provider's host image, or, where the nodes are
    not machines Ray starts (e.g. a pre-provisioned or container-only provider), a docker image."""
    provider = config.get("provider", {}).get("type", "")
    docker = config.get("docker") or {}
    unpinned = []
    for name, spec in config.get("available_node_types", {}).items():
        if _host_image(provider, spec.get("node_config", {})):
            continue
        node_docker = spec.get("docker") or {}
        container = docker.get("image") or docker.get("worker_image") or node_docker.get("worker_image")
        if provider not in ("aws", "gcp", "azure") and container:
            continue
        unpinned.append(name)
    return unpinned


def locked_cuda_major(lock: dict[str, Any]) -> int | None:
    """The newest CUDA major among the locked torch builds (the lock holds one per Python range),
    read from the CUDA packages torch depends on: `cuda-toolkit` 13.x, `nvidia-cudnn-cu13`, ..."""
    versions: dict[str, list[str]] = {}
    for package in lock["package"]:
        versions.setdefault(package["name"], []).append(package["version"])
    majors: set[int] = set()
    for torch in (p for p in lock["package"] if p["name"] == "torch"):
        for dep in torch.get("dependencies", []):
            if suffix := CUDA_SUFFIX.search(dep["name"]):
                majors.add(int(suffix[1]))
            elif dep["name"] in CUDA_VERSIONED:
                # A dependency names its version when the lock holds several of that package.
                for version in [dep["version"]] if "version" in dep else versions.get(dep["name"], []):
                    majors.add(int(version.split(".")[0]))
    return max(majors) if majors else None


def locked_torch_glibc(lock: dict[str, Any]) -> tuple[int, int] | None:
    """The newest glibc any locked torch wheel for Linux x86_64 needs (its manylinux tag)."""
    tags = [
        (int(match[1]), int(match[2]))
        for package in lock["package"] if package["name"] == "torch"
        for wheel in package.get("wheels", [])
        if (match := MANYLINUX.search(wheel["url"]))
    ]  # fmt: skip
    return max(tags) if tags else None


def image_problems(cluster_text: str, lock: dict[str, Any]) -> list[str]:
    """Everything that keeps the locked torch from running on the cluster's image ([] if none)."""
    problems = [f"node type {name!r} has no pinned image (node_config.ImageId on AWS)"
                for name in unpinned_node_types(yaml.safe_load(cluster_text))]
    statement = read_statement(cluster_text)
    cuda = locked_cuda_major(lock)
    if cuda is None:
        problems.append("uv.lock's torch depends on no CUDA package: no CUDA build to run on the GPUs")
    if statement is None:
        problems.append("cluster.yaml documents no NVIDIA driver: no line like "
                        "'# gpu-image: nvidia-driver >= 580, CUDA 13, glibc 2.39'")
        return problems
    runs = max_cuda_for_driver(statement.driver)
    if cuda is not None and (runs is None or cuda > runs):
        problems.append(f"uv.lock's torch is built for CUDA {cuda}, but driver >= {statement.driver} "
                        f"runs CUDA {runs} at most (NVIDIA's compatibility table)")
    if cuda is not None and statement.cuda != cuda:
        problems.append(f"the gpu-image line says CUDA {statement.cuda}, uv.lock's torch is built for CUDA {cuda}")
    glibc = locked_torch_glibc(lock)
    if glibc is not None and statement.glibc < glibc:
        problems.append(f"the torch wheels need glibc >= {glibc[0]}.{glibc[1]} (manylinux), "
                        f"the image has {statement.glibc[0]}.{statement.glibc[1]}")
    return problems


def _lock() -> dict[str, Any]:
    return tomllib.loads(UV_LOCK.read_text())


def test_cluster_yaml_runs_the_locked_torch() -> None:
    assert image_problems(CLUSTER_YAML.read_text(), _lock()) == []


def test_the_lock_is_on_cuda_13_and_manylinux_2_28() -> None:
    # What cluster.yaml's comments and docs/cluster.md state; a new lock must update them too.
    lock = _lock()
    assert locked_cuda_major(lock) == 13
    assert locked_torch_glibc(lock) == (2, 28)
    statement = read_statement(CLUSTER_YAML.read_text())
    assert statement is not None
    docs = (REPO_ROOT / "docs" / "cluster.md").read_text()
    assert "### GPU image" in docs
    assert f"≥ {statement.driver}" in docs and f"CUDA {statement.cuda}" in docs


def test_driver_table() -> None:
    assert max_cuda_for_driver(470) == 11  # Ray's default AMI era: CUDA 11 only
    assert max_cuda_for_driver(535) == 12
    assert max_cuda_for_driver(580) == max_cuda_for_driver(595) == 13
    assert max_cuda_for_driver(440) is None


# A config as cluster.yaml was before the image was pinned: node types without ImageId, no
# documented driver (`git show 4a9ec44:cluster.yaml` fails the same way, on all four node types).
# `ray up` then boots Ray's default AMI, where `uv sync --locked` fails.
UNPINNED = """
provider: {type: aws, region: us-west-2}
available_node_types:
  head: {resources: {CPU: 0}, node_config: {InstanceType: m5.2xlarge}}
  gpu-1x: {min_workers: 0, max_workers: 8, resources: {}, node_config: {InstanceType: g5.2xlarge}}
  gpu-spot: {node_config: {InstanceType: g5.2xlarge, ImageId: latest_dlami}}
head_node_type: head
"""


def test_an_unpinned_config_is_refused() -> None:
    problems = image_problems(UNPINNED, _lock())
    assert unpinned_node_types(yaml.safe_load(UNPINNED)) == ["head", "gpu-1x", "gpu-spot"]
    assert any("documents no NVIDIA driver" in problem for problem in problems), problems
    assert len(problems) == 4, problems


PINNED = """
provider: {type: aws, region: us-west-2}
available_node_types:
  head: {node_config: {InstanceType: m5.2xlarge, ImageId: ami-0123456789abcdef0}}
  gpu-1x: {node_config: {InstanceType: g5.2xlarge, ImageId: "resolve:ssm:/aws/service/x/latest/ami-id"}}
head_node_type: head
"""


def test_a_driver_too_old_for_the_lock_is_refused() -> None:
    assert unpinned_node_types(yaml.safe_load(PINNED)) == []
    old_driver = "# gpu-image: nvidia-driver >= 535, CUDA 12, glibc 2.27\n" + PINNED
    problems = image_problems(old_driver, _lock())
    assert any("built for CUDA 13, but driver >= 535 runs CUDA 12 at most" in p for p in problems), problems
    assert any("need glibc >= 2.28" in p for p in problems), problems
    assert image_problems("# gpu-image: nvidia-driver >= 580, CUDA 13, glibc 2.35\n" + PINNED, _lock()) == []


def test_a_docker_image_does_not_pin_the_driver_on_aws() -> None:
    # The container brings its own userland, but torch talks to the host's kernel driver, which on
    # AWS comes from the AMI: without an ImageId that is Ray's default AMI again.
    with_docker = UNPINNED + "docker: {image: rayproject/ray:2.60.0-py312-gpu, container_name: ray_container}\n"
    assert "head" in unpinned_node_types(yaml.safe_load(with_docker))
    on_kubernetes = with_docker.replace("type: aws", "type: kuberay")
    assert unpinned_node_types(yaml.safe_load(on_kubernetes)) == []
