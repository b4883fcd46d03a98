"""Time core.metrics.evaluate_rank on a Market-1501-sized random problem.

Usage::

    uv run python benchmarks/eval_rank_speed.py --queries 3368 --gallery 15913 \
        --pids 751 --cameras 6 --seed 0 --threads 1

The problem is random but shaped like Market-1501's test split: every query
identity appears in the gallery (several images over several cameras), the rest
of the gallery is other identities / distractors, and distances are lower for
true matches so that the metrics land in a realistic range (not ~0).
Prints wall seconds, queries/s and peak RSS of the process.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=15913)
    p.add_argument("--pids", type=int, default=751, help="identities in the test split")
    p.add_argument("--cameras", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP/torch threads")
    p.add_argument("--max-rank", type=int, default=50)
    p.add_argument("--query-chunk", type=int, default=None, help="override evaluate_rank chunk")
    p.add_argument("--repeat", type=int, default=1, help="timed repetitions (best is reported)")
    args = p.parse_args(argv)
    # Thread counts must be fixed before numpy/torch load their thread pools.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import resource
    import time

    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from core.metrics import evaluate_rank

    # evaluate_rank itself never imports torch; importing it here just to pin
    # its pool would add ~0.5 GB to the RSS figure. Pin it if something loaded it.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    # Gallery: every pid gets images (Market has ~21 per id); extra entries are
    # distractors (pid 0, as in Market's "0000" files).
    n_id_imgs = int(args.gallery * 0.85)
    g_pids = np.concatenate(
        [rng.integers(1, args.pids + 1, n_id_imgs), np.zeros(args.gallery - n_id_imgs, dtype=np.int64)]
    )
    g_cams = rng.integers(0, args.cameras, args.gallery)
    q_pids = rng.integers(1, args.pids + 1, args.queries)
    q_cams = rng.integers(0, args.cameras, args.queries)

    # Distances, float32 like a real feature distance matrix: negatives around
    # 1.0, true matches pulled closer, tuned so the scores resemble a decent
    # Market model (Rank-1 ~0.98, mAP ~0.6). Built in place, without big float64
    # temporaries, so that peak RSS mostly reflects evaluate_rank itself.
    dist = rng.standard_normal((args.queries, args.gallery), dtype=np.float32)
    dist *= np.float32(0.1)
    dist += np.float32(1.0)
    same = q_pids[:, None] == g_pids[None, :]
    dist[same] -= np.float32(0.35)
    del same

    kwargs = {"max_rank": args.max_rank}
    if args.query_chunk is not None:
        kwargs["query_chunk"] = args.query_chunk
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        cmc, m_ap, m_inp = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, **kwargs)
        best = min(best, time.perf_counter() - t0)
    # ru_maxrss is KiB on Linux (bytes on macOS).
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    print(f"problem        : {args.queries} queries x {args.gallery} gallery, "
          f"{args.pids} pids, {args.cameras} cameras, seed {args.seed}, threads {args.threads}")
    print(f"distmat        : {dist.nbytes / 2**20:.0f} MiB ({dist.dtype})")
    print(f"evaluate_rank  : {best:.3f} s  ({args.queries / best:,.0f} queries/s)")
    print(f"peak RSS       : {peak_mb:.0f} MiB (before evaluate_rank: {rss_before * scale:.0f} MiB)")
    print(f"metrics        : Rank-1 {cmc[0]:.4f}  Rank-5 {cmc[4 if len(cmc) > 4 else -1]:.4f}  "
          f"mAP {m_ap:.4f}  mINP {m_inp:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
