"""Shared test setup. Importing `factory` first keeps Ray's per-worker `uv run` environment
rebuild off for the local clusters tests start (see factory/__init__.py)."""

import factory  # noqa: F401  (side effect: Ray environment flag, before any test imports Ray)
