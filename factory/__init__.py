"""factory: the Diffusion-ReID generation pipeline (`python -m factory.build`)."""

import os as _os

# Ray's `uv run` integration re-creates the driver's uv environment for every worker by
# packaging the working directory and running `uv run` there. On a remote cluster
# (`ray job submit`, RAY_ADDRESS set) that is what makes workers match the driver; on a local
# cluster the workers can simply share the driver's interpreter, and rebuilding a multi-GB
# torch environment per worker costs minutes. Ray reads this flag when it is imported, so it
# is set here, before any module of ours imports Ray.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import logging as _logging

# bitsandbytes (locked for generation.use_8bit_adam) is imported by diffusers/transformers
# whenever it is installed; on CPUs with AVX512-BF16 its CPU backend then warns that it cannot
# fetch an optional 4-bit kernel from the Hub. We never use 4-bit CPU kernels: keep it quiet.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
