"""The shared base under `trainers`, `eval` and `factory` (which import it, never the other way):
config models and their YAML loader (`config`), storage locations as URIs (`storage`), reaching
Ray (`cluster`), dataset records and adapters (`datasets`), the shard schema (`shards`) and the
Re-ID metrics (`metrics`)."""

import os as _os

# Ray's `uv run` integration re-creates the driver's uv environment for every worker by
# packaging the working directory and running `uv run` there. On a remote cluster
# (`ray job submit`, RAY_ADDRESS set) that is what makes workers match the driver; on a local
# cluster the workers can simply share the driver's interpreter, and rebuilding a multi-GB
# torch environment per worker costs minutes. Ray reads this flag when it is imported, so it
# is set here, before any module of ours imports Ray.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
