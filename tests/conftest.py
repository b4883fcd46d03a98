"""Shared test setup. Importing `core` first keeps Ray's per-worker `uv run` environment
rebuild off for the local clusters tests start (see core/__init__.py)."""

import core  # noqa: F401  (side effect: Ray environment flag, before any test imports Ray)

import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

# Ray's temporary directory, private to this test session: a bare `ray.init()` (Ray Data and
# Ray Train call one when nothing is initialised) reads the address file there, so a cluster
# that a `ray start` on this machine registered, live or stale, is never joined by accident.
# Short and under /tmp: Ray's Unix sockets live inside it (107-byte path limit).
_PRIVATE_RAY_TMPDIR = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
os.environ["RAY_TMPDIR"] = _PRIVATE_RAY_TMPDIR
os.environ.pop("RAY_ADDRESS", None)


def pytest_unconfigure(config):
    shutil.rmtree(_PRIVATE_RAY_TMPDIR, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_env():
    """A local S3-compatible server; its AWS_* variables are set in os.environ for the session
    (so subprocesses and the Ray workers they start inherit them), then restored."""
    from tests.object_store import s3_server

    with s3_server() as env:
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def bucket(s3_env, request) -> str:
    """A fresh bucket per test: `s3://<name>`."""
    from tests.object_store import create_bucket

    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    create_bucket(name)
    return f"s3://{name}"
