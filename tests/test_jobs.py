"""`ray job submit` on a real local head: `ray start --head` on 127.0.0.1 with token
authentication (as `cluster.yaml` sets it up), the factory's build submitted with the repository as
working dir, polled until SUCCEEDED, shards checked; the head is stopped afterwards.

Choices, mirrored in docs/cluster.md:
- The entrypoint is plain `python -m factory.build`: the head was started by this venv's `ray`
  with the venv first on PATH, so the job's `python` is the venv's, as on a `ray up` node where
  the start command puts the synced environment first on PATH. `uv run` inside the job (what
  the docs show for a cluster) would make Ray's uv hook re-create the environment in every
  worker's copy of the working dir here: minutes per worker on this machine. The head's env
  switches that hook off (RAY_ENABLE_UV_RUN_RUNTIME_ENV=0); on a cluster it stays on.
- The working dir upload relies on Ray honouring .gitignore (.venv/, .cache/, outputs/ stay
  behind); the test looks at the unpacked copy the job ran in.
- The head is stopped through its own process group and the processes under its private temp
  dir, never with `ray stop` (which stops every Ray instance on the machine, other users' too).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest

from core.settings.run import REPO_ROOT
from tests.pipeline_fixtures import save_filter_model, save_tiny_models, small_preset

VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Head:
    url: str  # the dashboard / job server
    env: dict[str, str]  # what a client of this head runs with (token auth on)
    token: str
    private: Path

    def get(self, path: str, authenticated: bool = True) -> dict:
        request = urllib.request.Request(self.url + path)
        if authenticated:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())


def _stop(process: subprocess.Popen, private: Path) -> None:
    """Stop this head only: `ray start --block` first (it drains the node and stops its own
    processes, ~2 s alone; a SIGTERM to the whole group would stop the GCS under it and leave
    the drain waiting 30 s for it; in the full suite the drain has also outlasted 20 s, so it
    gets 5), then its process group, then anything still running from its temp dir (workers
    Ray started in sessions of their own)."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        pass
    leftovers = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if str(private) in " ".join(proc.info["cmdline"] or []):
                leftovers.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for proc in leftovers:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftovers, timeout=10)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    private = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    token_file = private / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "RAY_TMPDIR": str(private),  # the address file too: no other `ray.init()` here joins this head
        }
    )
    dashboard_port = _free_port()
    command = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", str(_free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
        "--num-cpus", "2", "--temp-dir", str(private / "ray"), "--disable-usage-stats",
    ]  # fmt: skip
    log = (private / "head.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dashboard_port}", env, token, private)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"ray start failed:\n{(private / 'head.log').read_text()[-4000:]}"
            try:
                head.get("/api/version")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the job server did not come up"
                time.sleep(2)
        yield head
    finally:
        _stop(process, private)
        log.close()
        shutil.rmtree(private, ignore_errors=True)


@pytest.fixture(scope="module")
def preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from core.datasets.config import SourceConfig, SyntheticSpec
    from core.datasets.registry import load_source

    root = tmp_path_factory.mktemp("jobs")
    source = root / "source"
    load_source(SourceConfig(kind="synthetic", root=source, generate=SyntheticSpec(ids=8, cameras=2, seed=3)))
    sd, blip = save_tiny_models(root / "models")
    return small_preset(root / "preset.yaml", source, sd, blip, save_filter_model(root / "filter", source))


def _submit_and_wait(head: Head, name: str, entrypoint: list[str], timeout: float = 900) -> str:
    """`ray job submit --working-dir REPO -- ENTRYPOINT`; poll until it ends; assert SUCCEEDED;
    return the job's logs."""
    submission_id = f"{name}-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [str(VENV_BIN / "ray"), "job", "submit", "--address", head.url, "--submission-id", submission_id,
         "--working-dir", str(REPO_ROOT), "--no-wait", "--", *entrypoint],
        env=head.env, capture_output=True, text=True, timeout=300,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline = time.monotonic() + timeout
    while (status := head.get(f"/api/jobs/{submission_id}")["status"]) not in {"SUCCEEDED", "FAILED", "STOPPED"}:
        assert time.monotonic() < deadline, f"job still {status}"
        time.sleep(5)
    logs = head.get(f"/api/jobs/{submission_id}/logs")["logs"]
    assert status == "SUCCEEDED", logs[-4000:]
    return logs


def test_job_server_rejects_requests_without_the_token(head: Head) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        head.get("/api/jobs/", authenticated=False)
    assert refused.value.code == 401


@pytest.mark.slow
def test_build_submitted_as_a_job_succeeds_and_writes_shards(head: Head, preset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    logs = _submit_and_wait(head, "factory-build", ["python", "-m", "factory.build", "--config", str(preset), "--out", str(out)])

    # It joined the head (RAY_ADDRESS from the job) instead of starting a Ray of its own.
    assert "Connecting to existing Ray cluster" in logs
    assert "5 processed this run" in logs
    rows = pd.read_parquet(out / "shards")
    assert rows["identity"].nunique() == 5 and len(rows) == 5 * 4
    assert len(json.loads((out / "manifest.json").read_text())["identities"]) == 5

    # The job ran in Ray's copy of the repository, without the ignored environment and caches.
    copies = [p for p in head.private.glob("ray/session_2*/runtime_resources/working_dir_files/_ray_pkg_*") if p.is_dir()]
    assert len(copies) == 1, copies
    uploaded = {path.name for path in copies[0].iterdir()}
    assert {"factory", "pyproject.toml", "uv.lock", "configs"} <= uploaded
    assert not {".venv", ".cache", "outputs"} & uploaded


@pytest.mark.slow
def test_pretraining_submitted_as_a_job_joins_the_cluster(head: Head, tmp_path: Path) -> None:
    """The trainer, like the build, runs inside `ray job submit` unchanged: it joins the head
    through the job's RAY_ADDRESS and its Ray Train run writes the backbone."""
    from core.datasets.config import SyntheticSpec
    from core.datasets.market import load_market1501
    from core.datasets.synthetic import generate_synthetic_dataset
    from trainers.pretrain.shards import write_shards

    source = generate_synthetic_dataset(tmp_path / "source", SyntheticSpec(ids=6, cameras=2, images_per_camera=3, seed=0))
    write_shards(load_market1501(source).train, tmp_path / "data", image_size=(64, 32), rows_per_shard=64)
    out = tmp_path / "ckpt"
    overrides = ["pretrain.arch=resnet18", "pretrain.image_size=[64,32]", "pretrain.batch_size=8",
                 "pretrain.epochs=2", "pretrain.warmup_epochs=1", "pretrain.decode_on=trainer"]
    logs = _submit_and_wait(head, "pretrain", [
        "python", "-m", "trainers.pretrain", "--data", str(tmp_path / "data"), "--out", str(out),
        *[arg for o in overrides for arg in ("--set", o)]])
    assert "Connecting to existing Ray cluster" in logs
    assert "pretrain: done" in logs
    assert (out / "backbone.safetensors").stat().st_size > 0
