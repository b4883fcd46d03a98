"""Re-ID retrieval metrics under the Market-1501 protocol (CMC, mAP, mINP).

:func:`compute_distance_matrix` works in chunks of query rows; :func:`evaluate_rank` is fully
vectorised (no per-query Python loop).

Protocol (as in Zheng et al., Market-1501, and the torchreid / AGW code):

1. For each query the gallery is ranked by ascending distance. Ties are broken
   by gallery index (stable sort) so that results are deterministic.
2. Gallery entries with the query's pid *and* the query's camera are removed
   (they would be trivially easy matches of the same tracklet); the remaining
   entries are re-ranked contiguously (1, 2, 3, ...).
3. Queries with no remaining true match (same pid, other camera) are skipped.
4. CMC, AP and INP are computed per valid query and averaged over valid queries.

No pid value is special here: junk images (pid ``-1``) should be dropped by the
dataset loader beforehand, and distractors (pid ``0``) simply never match a query.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np

__all__ = ["compute_distance_matrix", "evaluate_rank"]

# Queries ranked per chunk. Bounds peak memory: the per-chunk working set is a
# handful of (chunk x n_gallery) arrays (uint64 sort keys, int32 ranks, float64
# precisions, a few bools), i.e. roughly 512 x 15913 x ~30 B ~= 250 MB on Market,
# instead of several GB when the whole 3368 x 15913 problem is done at once.
_DEFAULT_QUERY_CHUNK = 512


def _as_numpy(x: Any, name: str, labels: bool = False) -> np.ndarray:
    """Convert a numpy array / torch tensor / sequence to a numpy array (1-D for `labels`)."""
    # Avoid importing torch here: duck-type on the tensor API instead.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - defensive
        raise ValueError(f"{name}: cannot convert to a numpy array ({exc})") from exc
    if labels and arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _stable_argsort_rows(dist: np.ndarray) -> np.ndarray:
    """Row-wise argsort, ties broken by column index (== ``kind="stable"``).

    For float16/float32 distances this packs ``(order-preserving distance bits,
    column index)`` into unique uint64 keys and value-sorts them: numpy's SIMD
    value sort of uint64 is ~2x faster than a stable float argsort, and because
    every key is unique the result is exactly the stable order. Other dtypes
    (float64 cannot be packed losslessly) use ``np.argsort(kind="stable")``.
    The returned index array may be uint32 and/or a non-contiguous view.
    """
    n = dist.shape[1]
    if dist.dtype not in (np.float32, np.float16) or n >= 2**32:
        return np.argsort(dist, axis=1, kind="stable")
    # "+ 0" maps -0.0 to +0.0 (they compare equal, but their bits differ) and
    # yields a fresh contiguous float32 buffer we can reinterpret and mutate.
    bits = np.add(dist, np.float32(0), dtype=np.float32).view(np.uint32)
    # IEEE order -> unsigned order: flip all bits of negatives, only the sign
    # bit of non-negatives.
    flip = np.right_shift(bits, 31)
    np.negative(flip, out=flip)  # 0 or 0xFFFFFFFF (uint wrap-around)
    flip |= np.uint32(0x80000000)
    bits ^= flip
    del flip
    keys = bits.astype(np.uint64)
    del bits
    keys <<= np.uint64(32)
    keys |= np.arange(n, dtype=np.uint64)
    keys.sort(axis=1)
    if sys.byteorder == "little":
        return keys.view(np.uint32)[:, 0::2]  # low halves = column indices
    return keys & np.uint64(0xFFFFFFFF)  # pragma: no cover - big-endian hosts


def evaluate_rank(
    distmat: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    max_rank: int = 50,
    *,
    query_chunk: int = _DEFAULT_QUERY_CHUNK,
) -> tuple[np.ndarray, float, float]:
    """Evaluate a ranking with the Market-1501 protocol (see the module docstring).

    `distmat` holds ``(num_q, num_g)`` distances (smaller = more similar), a numpy array or torch
    tensor; NaN is rejected, ``inf`` is allowed. `query_chunk` queries are ranked at once: it
    trades speed for peak memory.

    Returns ``(cmc, mAP, mINP)``: ``cmc`` (float64, length ``max_rank``) has ``cmc[k-1]`` = the
    fraction of valid queries whose first true match is within the top ``k`` (after removing
    same-pid same-camera gallery entries); mINP is the mean inverse negative penalty (Ye et al.,
    AGW), ``num_positives / rank_of_hardest_positive`` (1-based), averaged over valid queries.

    If the gallery has fewer than ``max_rank`` entries, ranks beyond the gallery size cannot
    change the curve, so the CMC is padded with its last value (torchreid instead truncates).

    Raises `ValueError` naming the offending argument, or when no query has a valid true match.
    """
    dist = _as_numpy(distmat, "distmat")
    if dist.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_q, num_g), got shape {dist.shape}")
    num_q, num_g = dist.shape
    qp = _as_numpy(q_pids, "q_pids", labels=True)
    gp = _as_numpy(g_pids, "g_pids", labels=True)
    qc = _as_numpy(q_camids, "q_camids", labels=True)
    gc = _as_numpy(g_camids, "g_camids", labels=True)
    for name, arr, want, axis in (
        ("q_pids", qp, num_q, "rows"),
        ("q_camids", qc, num_q, "rows"),
        ("g_pids", gp, num_g, "columns"),
        ("g_camids", gc, num_g, "columns"),
    ):
        if arr.shape[0] != want:
            raise ValueError(
                f"len({name})={arr.shape[0]} does not match distmat {axis} "
                f"(distmat shape {dist.shape})"
            )
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    max_rank = int(max_rank)
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    if num_q == 0 or num_g == 0:
        raise ValueError(f"no valid query: empty problem (distmat shape {dist.shape})")
    if not np.issubdtype(dist.dtype, np.number) or np.issubdtype(dist.dtype, np.complexfloating):
        raise ValueError(f"distmat must be real-valued, got dtype {dist.dtype}")
    if np.issubdtype(dist.dtype, np.floating) and np.isnan(dist).any():
        # NaN would silently sort last and distort every metric.
        raise ValueError("distmat contains NaN")

    # Histogram of the (kept-list) rank of each valid query's first true match;
    # bucket max_rank collects everything beyond the curve. CMC = cumsum / n_valid.
    first_hit_hist = np.zeros(max_rank + 1, dtype=np.int64)
    ap_sum = 0.0
    inp_sum = 0.0
    num_valid = 0

    for start in range(0, num_q, query_chunk):
        stop = min(start + query_chunk, num_q)
        # Stable order => ties are ranked by gallery index, deterministically.
        order = _stable_argsort_rows(dist[start:stop])
        same_pid = gp[order] == qp[start:stop, None]
        same_cam = gc[order] == qc[start:stop, None]
        keep = ~(same_pid & same_cam)
        pos = same_pid & keep  # true matches that survive the removal
        del order, same_cam

        num_pos = pos.sum(axis=1)
        valid = num_pos > 0
        if not valid.any():
            continue
        # Only valid rows matter from here on; dropping the others early keeps
        # the float work proportional to the useful part.
        keep, pos, num_pos = keep[valid], pos[valid], num_pos[valid]
        rows = np.arange(pos.shape[0])

        # 1-based rank of each entry within the kept (re-ranked) list; it is
        # only read at kept positions, where it is exact.
        kept_rank = np.cumsum(keep, axis=1, dtype=np.int32)
        del keep
        # Number of true matches found up to and including each position.
        hits = np.cumsum(pos, axis=1, dtype=np.int32)

        # AP = mean over positives of precision at that positive's rank.
        precision = np.divide(hits, kept_rank, out=np.zeros(hits.shape), where=pos)
        ap_sum += float((precision.sum(axis=1) / num_pos).sum())
        del precision, hits

        # First / last positive via argmax on the bool matrix (first True).
        first_idx = pos.argmax(axis=1)
        last_idx = pos.shape[1] - 1 - pos[:, ::-1].argmax(axis=1)
        first_rank = kept_rank[rows, first_idx]  # >= 1
        hardest_rank = kept_rank[rows, last_idx]
        inp_sum += float((num_pos / hardest_rank).sum())

        first_hit_hist += np.bincount(np.minimum(first_rank, max_rank + 1) - 1, minlength=max_rank + 1)
        num_valid += int(valid.sum())

    if num_valid == 0:
        raise ValueError(
            "no valid query: every query's true matches are absent from the gallery "
            "or share the query's camera (same-pid same-camera entries are removed)"
        )

    # Ranks past num_g never occur, so the tail of the curve stays at its
    # last in-gallery value: this is the documented "pad with the last value".
    cmc = np.cumsum(first_hit_hist[:max_rank]).astype(np.float64) / num_valid
    return cmc, ap_sum / num_valid, inp_sum / num_valid


def compute_distance_matrix(
    query_features: Any,
    gallery_features: Any,
    metric: Literal["euclidean", "cosine"] = "euclidean",
    *,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Pairwise ``(num_q, num_g)`` distances of ``(num_q, dim)`` and ``(num_g, dim)`` features
    (numpy arrays or torch tensors: the work runs on a tensor's device, e.g. CUDA, else on the CPU)
    as a float32 numpy array (float64 if either input is float64).

    ``"euclidean"`` is the true (not squared) L2 distance; ``"cosine"`` is ``1 - cos_sim`` in
    ``[0, 2]`` (features are L2-normalised internally; an all-zero feature is at distance 1 from
    everything). `chunk_size` query rows per matrix product bound the temporary memory.
    """
    import torch  # local import: evaluate_rank must not pay for torch

    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")

    device = next((f.device for f in (query_features, gallery_features) if isinstance(f, torch.Tensor)), None)

    def to_tensor(x: Any, name: str) -> torch.Tensor:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (n, dim), got shape {tuple(t.shape)}")
        # float64 is kept when given (precision); everything else -> float32.
        t = t.to(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        return t.to(device) if device is not None else t

    q = to_tensor(query_features, "query_features")
    g = to_tensor(gallery_features, "gallery_features")
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"feature dims differ: query_features {tuple(q.shape)} vs "
            f"gallery_features {tuple(g.shape)}"
        )
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)

    if metric == "cosine":
        q = torch.nn.functional.normalize(q, dim=1)
        g = torch.nn.functional.normalize(g, dim=1)
    else:
        g_sq = (g * g).sum(dim=1)  # (num_g,), reused by every chunk

    out = np.empty((q.shape[0], g.shape[0]), dtype=np.float64 if dtype == torch.float64 else np.float32)
    with torch.no_grad():
        for start in range(0, q.shape[0], chunk_size):
            qc = q[start : start + chunk_size]
            prod = qc @ g.T
            if metric == "cosine":
                d = (1.0 - prod).clamp_(0.0, 2.0)  # rounding can step outside
            else:
                # ||q||^2 + ||g||^2 - 2 q.g ; clamp because cancellation can make
                # near-identical pairs slightly negative before the sqrt.
                d = ((qc * qc).sum(dim=1, keepdim=True) + g_sq - 2.0 * prod).clamp_min_(0).sqrt_()
            out[start : start + qc.shape[0]] = d.cpu().numpy()
    return out
