"""Shard writing at scale: seconds and peak memory of the process that turns staged identities
into shards (`factory.output.store.write_shards`, what every build's finalize runs), at 1k, 5k and 20k
identities. The target: peak RSS at 20k within 1.5x of that at 1k (memory bounded by the
shuffle window, not by the dataset).

    uv run python benchmarks/driver_scale.py                       # 1000 5000 20000 identities
    uv run python benchmarks/driver_scale.py --identities 1000 5000 --root s3://bucket/bench --json out.json

Each size gets its own output location (a temporary folder by default, or ROOT/<n>): N staging
files of 150 rows each (~8 KB of JPEG bytes per row; `--kept` of them kept), one manifest, then
the shards written in a child process of its own, whose peak RSS (`wait4` rusage) is reported.
The location of each size is deleted before the next (20k identities are ~24 GB of staging).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from core.shards import encode_image
from core.storage import resolve
from factory.schema import STAGED_SCHEMA
from factory.output.store import staging_file

ROWS_PER_IDENTITY = 150


def jpeg_pool(count: int, target_bytes: int, seed: int = 0) -> list[bytes]:
    """`count` distinct JPEGs of noise, each about `target_bytes` (quality searched once)."""
    rng = np.random.default_rng(seed)

    def encode(pixels: np.ndarray, quality: int) -> bytes:
        return encode_image(Image.fromarray(pixels), quality=quality)

    sample = rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)
    quality = min(range(5, 96, 5), key=lambda q: abs(len(encode(sample, q)) - target_bytes))
    return [encode(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8), quality) for _ in range(count)]


def write_staging(root: str, identities: int, kept_fraction: float, pool: list[bytes]) -> dict:
    """N staging files as the write stage leaves them, and the manifest entries for them."""
    location = resolve(root)
    kept_per_identity = round(ROWS_PER_IDENTITY * kept_fraction)
    entries = {}
    for pid in range(identities):
        identity = f"bench/{pid}"
        images = [pool[(pid * 7 + i) % len(pool)] for i in range(ROWS_PER_IDENTITY)]
        table = pa.table({
            "image": [{"bytes": b, "path": f"{pid}_{i:04d}.jpg"} for i, b in enumerate(images)],
            "source": ["bench"] * ROWS_PER_IDENTITY,
            "source_pid": [pid] * ROWS_PER_IDENTITY,
            "identity": [identity] * ROWS_PER_IDENTITY,
            "prompt": [f"a photo of zwx person {pid}"] * ROWS_PER_IDENTITY,
            "seed": list(range(pid * 1000, pid * 1000 + ROWS_PER_IDENTITY)),
            "score": [0.9] * kept_per_identity + [0.1] * (ROWS_PER_IDENTITY - kept_per_identity),
            "index": list(range(ROWS_PER_IDENTITY)),
            "kept": [True] * kept_per_identity + [False] * (ROWS_PER_IDENTITY - kept_per_identity),
            "reason": [""] * kept_per_identity + ["score 0.100 < threshold 0.5"] * (ROWS_PER_IDENTITY - kept_per_identity),
        }, schema=STAGED_SCHEMA)
        (location / staging_file(identity)).write_parquet(table)
        entries[identity] = {"file": staging_file(identity), "generated": ROWS_PER_IDENTITY, "kept": kept_per_identity}
        if (pid + 1) % 1000 == 0:
            print(f"  staged {pid + 1}/{identities}", flush=True)
    manifest = {"version": 1, "identities": entries, "failed": {}}
    (location / "manifest.json").write_json(manifest)
    return manifest


def finalize_in_child(root: str, rows_per_shard: int) -> dict:
    """Run the shard writer in a fresh process; its seconds, peak RSS and what it wrote."""
    command = [sys.executable, __file__, "--finalize-only", root, "--rows-per-shard", str(rows_per_shard)]
    read_end, write_end = os.pipe()
    process = subprocess.Popen(command, stdout=write_end, pass_fds=(write_end,))
    os.close(write_end)
    _, status, usage = os.wait4(process.pid, 0)
    output = os.read(read_end, 1 << 20).decode()
    os.close(read_end)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"the shard writer failed:\n{output}")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux: KiB
    return result


def finalize_only(root: str, rows_per_shard: int) -> None:
    from factory.output.store import OutputStore

    started = time.perf_counter()
    store = OutputStore(root)
    loaded = time.perf_counter() - started
    result = store.finalize(rows_per_shard)
    print(json.dumps({"finalize_seconds": round(time.perf_counter() - started, 2), "manifest_seconds": round(loaded, 2),
                      "identities": result.identities, "images": result.images, "shards": len(result.shards)}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, nargs="+", default=[1000, 5000, 20000])
    parser.add_argument("--kept", type=float, default=1 / 3, help="fraction of each identity's rows kept (default 1/3)")
    parser.add_argument("--image-bytes", type=int, default=8192, help="target JPEG size per row")
    parser.add_argument("--rows-per-shard", type=int, default=4096, help="as output.rows_per_shard")
    parser.add_argument("--root", default=None, help="base URI for the outputs (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--finalize-only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.finalize_only:
        finalize_only(args.finalize_only, args.rows_per_shard)
        return 0

    pool = jpeg_pool(600, args.image_bytes)
    print(f"JPEG pool: 600 images, mean {np.mean([len(b) for b in pool]) / 1024:.1f} KiB; "
          f"{ROWS_PER_IDENTITY} rows per identity, {args.kept:.0%} kept; load {os.getloadavg()[0]:.2f}")
    figures = []
    for count in args.identities:
        root = f"{args.root.rstrip('/')}/{count}" if args.root else tempfile.mkdtemp(prefix=f"driver-scale-{count}-")
        print(f"{count} identities -> {root}", flush=True)
        started = time.perf_counter()
        write_staging(root, count, args.kept, pool)
        staged_seconds = time.perf_counter() - started
        result = finalize_in_child(root, args.rows_per_shard)
        result.update(identities_staged=count, staging_seconds=round(staged_seconds, 1))
        figures.append(result)
        print(f"  finalize {result['finalize_seconds']} s, peak RSS {result['peak_rss_mib']} MiB, "
              f"{result['images']} images in {result['shards']} shards", flush=True)
        resolve(root).delete_dir()
    base = figures[0]["peak_rss_mib"]
    print("\n| identities | images in shards | shards | finalize s | peak RSS MiB | RSS / first |")
    print("|---|---|---|---|---|---|")
    for f in figures:
        print(f"| {f['identities_staged']} | {f['images']} | {f['shards']} | {f['finalize_seconds']} | "
              f"{f['peak_rss_mib']} | {f['peak_rss_mib'] / base:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
