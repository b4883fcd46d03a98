"""Build, pre-training and downstream evaluation on a two-node cluster whose nodes share no
filesystem: the user's path on `cluster.yaml` (no EFS), on one machine.

- The head runs with `--num-cpus 0` (as in cluster.yaml): every task and actor lands on the worker.
- The worker node's Ray processes run in their own mount namespace (`unshare --mount`) in which
  an empty tmpfs hides everything the driver has locally: the source datasets, the tiny models,
  the downstream benchmark, the driver's caches (Hugging Face, reid-factory, torch) and the
  repository's `.cache/` and `outputs/`. The worker sees an empty, writable folder at each of
  those paths: its own node-local disk.
- Outputs go to an object store (a local S3-compatible server reached through AWS_* only); a local
  `--out` that only the driver sees is refused by the cluster check within a minute.
- Everything runs inside a private PID namespace (`unshare --pid --fork`): when the script
  ends, or the test times out, the kernel kills every process it started.

Needs root (namespaces); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml

from core.storage import resolve
from core.settings.run import REPO_ROOT
from tests.object_store import _free_port
from tests.pipeline_fixtures import save_tiny_models, small_preset

pytestmark = pytest.mark.slow

IDENTITIES = 6


def _namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def hidden_root():
    """The driver's local files, under one folder the worker node cannot see."""
    root = Path(tempfile.mkdtemp(prefix="nsfs-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _preset(root: Path) -> Path:
    from core.datasets.config import SourceConfig, SyntheticSpec
    from core.datasets.registry import load_source

    source = root / "source"
    load_source(SourceConfig(kind="synthetic", root=source, generate=SyntheticSpec(ids=IDENTITIES, cameras=2, seed=3)))
    sd, blip = save_tiny_models(root / "models")
    path = small_preset(root / "preset.yaml", source, sd, blip, filter_dir=None)
    config = yaml.safe_load(path.read_text())
    config["sources"][0]["generate"]["ids"] = IDENTITIES
    config["sequences"]["max_identities"] = IDENTITIES
    # The filter model is trained by this build, on the worker, from bytes the driver read.
    config["filter"]["reid"] = {"epochs": 2, "warmup_epochs": 0, "milestones": [], "ids_per_batch": 4,
                                "images_per_id": 2, "image_size": [32, 16]}
    config["pretrain"] = {"epochs": 1, "warmup_epochs": 0, "batch_size": 8, "image_size": [64, 32],
                          "shuffle_buffer": 16, "num_workers": 1, "cpus_per_worker": 1}
    config["downstream"] = {
        "datasets": [{"kind": "synthetic", "root": str(root / "benchmark"), "name": "tiny",
                      "generate": {"ids": 6, "cameras": 2, "seed": 7, "images_per_camera": 2}}],
        "methods": ["bot"], "inits": ["ours"], "settings": ["supervised"], "seeds": [0],
        "plots": False, "cpus_per_trial": 1,
        "train": {"arch": "resnet18", "image_size": [64, 32], "epochs": 1, "warmup_epochs": 0, "milestones": [],
                  "ids_per_batch": 4, "images_per_id": 2, "pad": 2, "loader_workers": 0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _script(root: Path, ray_tmp: Path, port: int, preset: Path, bucket: str) -> str:
    hidden = [root, REPO_ROOT / ".cache", REPO_ROOT / "outputs"]
    mounts = " && ".join(f"mkdir -p {p} && mount -t tmpfs nsfs {p}" for p in hidden)
    python = sys.executable
    ray = Path(sys.executable).parent / "ray"
    address = f"127.0.0.1:{port}"
    return textwrap.dedent(f"""\
        set -euo pipefail
        # Token authentication, as cluster.yaml sets it up; the token file is outside the hidden folders.
        export RAY_TMPDIR={ray_tmp} RAY_ADDRESS={address} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={ray_tmp}/auth_token
        {python} -c "import secrets; print(secrets.token_hex(32))" > {ray_tmp}/auth_token
        {ray} start --head --node-ip-address 127.0.0.1 --num-cpus 0 --num-gpus 0 --port {port} \
            --include-dashboard false --disable-usage-stats
        # The worker node: its own mount namespace, the driver's files behind empty tmpfs mounts.
        unshare --mount --propagation private bash -c \\
            '{mounts} && exec {ray} start --address {address} --node-ip-address 127.0.0.1 --num-cpus 4 --num-gpus 0 --block' \\
            > {ray_tmp}/worker.log 2>&1 &
        {python} - <<'EOF'
        import time, ray
        ray.init()
        deadline = time.monotonic() + 120
        while ray.cluster_resources().get("CPU", 0) < 4:
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(1)
        EOF
        echo "== local out"
        # A local --out only the driver sees: the cluster check must refuse it within a minute.
        start=$(date +%s)
        rc=0
        {python} -m factory.build --config {preset} --out {root}/local-out > {root}/local-out.log 2>&1 || rc=$?
        echo "local-out rc=$rc seconds=$(( $(date +%s) - start ))"
        tail -n 6 {root}/local-out.log
        echo "== build"
        {python} -m factory.build --config {preset} --out {bucket}/build
        echo "== pretrain"
        {python} -m trainers.pretrain --config {preset} --data {bucket}/build --out {bucket}/pre
        echo "== downstream"
        {python} -m eval.downstream --config {preset} --backbone {bucket}/pre/backbone.safetensors --out {bucket}/ds
        echo "== done"
        """)


@pytest.mark.skipif(not _namespaces_available(), reason="needs root and unshare (mount and PID namespaces)")
def test_build_pretrain_downstream_on_nodes_sharing_no_filesystem(hidden_root: Path, bucket: str) -> None:
    preset = _preset(hidden_root)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rns", dir="/tmp"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The driver's caches live in the hidden folder too; the worker gets an empty one at the same path.
    env.update({"XDG_CACHE_HOME": str(hidden_root / "cache"), "HF_HOME": str(hidden_root / "hf"),
                "PYTHONPATH": str(REPO_ROOT)})
    script = _script(hidden_root, ray_tmp, _free_port(), preset, bucket)
    try:
        run = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "bash", "-c", script], cwd=REPO_ROOT,
                             env=env, capture_output=True, text=True, timeout=1500)
        worker_log = (ray_tmp / "worker.log").read_text() if (ray_tmp / "worker.log").exists() else ""
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = run.stdout + run.stderr
    assert run.returncode == 0, f"{output[-6000:]}\n--- worker node:\n{worker_log[-2000:]}"
    assert "== done" in run.stdout
    refused = re.search(r"local-out rc=(\d+) seconds=(\d+)", run.stdout)
    assert refused and refused.group(1) == "2", run.stdout[-3000:]
    assert int(refused.group(2)) <= 60, f"the unshared --out was refused only after {refused.group(2)} s"
    assert "cannot read and write the output location" in run.stdout and "local-out" in run.stdout

    build = resolve(f"{bucket}/build")
    summary = json.loads((build / "summary.json").read_bytes())
    assert summary["identities_processed"] == IDENTITIES and summary["identities_failed"] == 0
    manifest = json.loads((build / "manifest.json").read_bytes())
    assert len(manifest["identities"]) == IDENTITIES
    assert (build / "filter_models" / "synthetic" / "filter_model.json").is_file()
    shards = (build / "shards").files(".parquet")
    rows = sum(shard.read_parquet().num_rows for shard in shards)
    assert rows == summary["kept"] > 0
    pre = resolve(f"{bucket}/pre")
    assert (pre / "backbone.safetensors").is_file() and (pre / "backbone.json").is_file()
    results = (resolve(f"{bucket}/ds") / "results.csv").read_text()
    assert "done" in results, results
