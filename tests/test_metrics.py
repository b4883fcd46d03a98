"""Tests for core.metrics: the vectorised evaluator against a naive reference.

The reference below is written independently of core/metrics.py on purpose (plain
Python loops, one query at a time) so that a shared bug cannot hide.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.metrics import _stable_argsort_rows, compute_distance_matrix, evaluate_rank


def naive_market1501(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """One-query-at-a-time Market-1501 evaluation in plain Python."""
    num_q, num_g = len(distmat), len(distmat[0])
    cmc_rows, aps, inps = [], [], []
    for i in range(num_q):
        # Ascending distance, ties broken by gallery index.
        ranked = sorted(range(num_g), key=lambda j: (float(distmat[i][j]), j))
        hits = []
        for j in ranked:
            if g_pids[j] == q_pids[i] and g_camids[j] == q_camids[i]:
                continue  # same identity seen from the same camera: removed
            hits.append(1 if g_pids[j] == q_pids[i] else 0)
        if sum(hits) == 0:
            continue  # no true match left: query skipped
        # CMC row: 1 from the first hit onwards, padded to max_rank.
        first = hits.index(1)  # 0-based
        cmc_rows.append([1.0 if k >= first else 0.0 for k in range(max_rank)])
        # AP: average of precision@k over the positions k of the hits.
        found, precisions = 0, []
        for k, h in enumerate(hits, start=1):
            if h:
                found += 1
                precisions.append(found / k)
        aps.append(sum(precisions) / len(precisions))
        # INP: (#positives) / (1-based rank of the last positive).
        last = max(k for k, h in enumerate(hits, start=1) if h)
        inps.append(sum(hits) / last)
    if not aps:
        raise ValueError("no valid query")
    n = len(aps)
    cmc = [sum(row[k] for row in cmc_rows) / n for k in range(max_rank)]
    return cmc, sum(aps) / n, sum(inps) / n


def _random_problem(seed: int, num_q: int = 40, num_g: int = 200):
    rng = np.random.default_rng(seed)
    num_pids, num_cams = 8, 3  # few ids/cameras: same-pid same-cam removal is frequent
    # Query pid 8 never appears in the gallery and pid 9 only on camera 0 (its
    # queries too), so some queries are skipped for each reason.
    q_pids = rng.integers(0, num_pids + 2, num_q)
    g_pids = rng.integers(0, num_pids, num_g)
    g_pids[rng.random(num_g) < 0.1] = 100  # distractor id, never queried
    g_pids[:3] = 9
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    q_cams[q_pids == 9] = 0
    g_cams[g_pids == 9] = 0
    # Coarse quantisation produces many exact ties in distances.
    dist = rng.integers(0, 12, (num_q, num_g)).astype(np.float32) / 4
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_rank", [1, 10, 250])
def test_matches_naive_reference(seed: int, max_rank: int) -> None:
    args = _random_problem(seed)
    cmc, m_ap, m_inp = evaluate_rank(*args, max_rank=max_rank, query_chunk=7)
    ref_cmc, ref_ap, ref_inp = naive_market1501(*[a.tolist() for a in args], max_rank)
    assert cmc.shape == (max_rank,)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6, rtol=0)
    assert m_ap == pytest.approx(ref_ap, abs=1e-6)
    assert m_inp == pytest.approx(ref_inp, abs=1e-6)
    # Property checks.
    assert np.all(np.diff(cmc) >= 0)
    assert np.all((cmc >= 0) & (cmc <= 1))
    assert 0 <= m_ap <= 1 and 0 <= m_inp <= 1
    assert isinstance(m_ap, float) and isinstance(m_inp, float)


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.float16])
def test_other_distance_dtypes_match_reference(dtype) -> None:
    dist, *labels = _random_problem(11)
    dist = (dist * 4 - 20).astype(dtype)  # integral values: exact in every dtype, negatives too
    cmc, m_ap, m_inp = evaluate_rank(dist, *labels, max_rank=15)
    ref_cmc, ref_ap, ref_inp = naive_market1501(dist.tolist(), *[a.tolist() for a in labels], 15)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6, rtol=0)
    assert m_ap == pytest.approx(ref_ap, abs=1e-6)
    assert m_inp == pytest.approx(ref_inp, abs=1e-6)


def test_packed_sort_equals_stable_argsort() -> None:
    rng = np.random.default_rng(3)
    d = (np.round(rng.normal(size=(6, 300)) * 3) / 3).astype(np.float32)  # ties, negatives
    d[0, :4] = [-0.0, 0.0, np.inf, -np.inf]
    d[1, :3] = [np.finfo(np.float32).max, -np.finfo(np.float32).tiny, 1e-45]
    got = np.asarray(_stable_argsort_rows(d)).astype(np.int64)
    np.testing.assert_array_equal(got, np.argsort(d, axis=1, kind="stable"))


def test_chunk_size_does_not_change_result() -> None:
    args = _random_problem(123, num_q=33, num_g=90)
    ref = evaluate_rank(*args, max_rank=20)
    for chunk in (1, 5, 33, 1000):
        cmc, m_ap, m_inp = evaluate_rank(*args, max_rank=20, query_chunk=chunk)
        np.testing.assert_array_equal(cmc, ref[0])
        assert m_ap == pytest.approx(ref[1], abs=1e-12)
        assert m_inp == pytest.approx(ref[2], abs=1e-12)


def test_accepts_torch_inputs() -> None:
    args = _random_problem(5)
    ref = evaluate_rank(*args, max_rank=10)
    got = evaluate_rank(*[torch.as_tensor(a) for a in args], max_rank=10)
    np.testing.assert_array_equal(got[0], ref[0])
    assert got[1:] == ref[1:]


def test_single_match_at_rank_one() -> None:
    dist = np.array([[0.1, 0.5, 0.9, 0.7]])
    cmc, m_ap, m_inp = evaluate_rank(dist, [1], [1, 2, 3, 4], [0], [1, 1, 1, 1], max_rank=4)
    np.testing.assert_array_equal(cmc, np.ones(4))
    assert m_ap == 1.0 and m_inp == 1.0


def test_single_match_at_last_rank() -> None:
    n = 6
    dist = np.arange(n, dtype=float)[None, :]
    g_pids = [2, 3, 4, 5, 6, 1]  # the only true match is the farthest entry
    cmc, m_ap, m_inp = evaluate_rank(dist, [1], g_pids, [0], [1] * n, max_rank=n)
    np.testing.assert_array_equal(cmc, [0, 0, 0, 0, 0, 1])
    assert m_ap == pytest.approx(1 / n, abs=1e-12)
    assert m_inp == pytest.approx(1 / n, abs=1e-12)


def test_same_camera_match_is_removed() -> None:
    # Gallery order by distance: [same pid same cam, distractor, same pid other cam].
    dist = np.array([[0.0, 1.0, 2.0]])
    cmc, m_ap, m_inp = evaluate_rank(dist, [7], [7, 3, 7], [0], [0, 1, 2], max_rank=3)
    # The rank-1 entry is removed, so the true match sits at rank 2 of [3, 7].
    np.testing.assert_array_equal(cmc, [0, 1, 1])
    assert m_ap == pytest.approx(0.5)
    assert m_inp == pytest.approx(0.5)
    # Same pid, other camera at rank 1 counts.
    cmc2, m_ap2, _ = evaluate_rank(dist, [7], [7, 3, 7], [5], [0, 1, 2], max_rank=3)
    np.testing.assert_array_equal(cmc2, [1, 1, 1])
    assert m_ap2 == pytest.approx((1 / 1 + 2 / 3) / 2)


def test_other_pid_same_camera_is_kept() -> None:
    # A different identity from the query camera is a valid (wrong) candidate.
    dist = np.array([[0.0, 1.0]])
    cmc, m_ap, _ = evaluate_rank(dist, [1], [2, 1], [0], [0, 3], max_rank=2)
    np.testing.assert_array_equal(cmc, [0, 1])
    assert m_ap == pytest.approx(0.5)


def test_invalid_queries_are_skipped() -> None:
    # Query 0 has a match at rank 1; query 1 only has a same-camera "match".
    dist = np.array([[0.0, 1.0], [0.0, 1.0]])
    cmc, m_ap, m_inp = evaluate_rank(dist, [1, 2], [1, 2], [0, 0], [1, 0], max_rank=2)
    np.testing.assert_array_equal(cmc, [1, 1])
    assert m_ap == 1.0 and m_inp == 1.0


def test_max_rank_larger_than_gallery_is_padded() -> None:
    dist = np.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    cmc, _, _ = evaluate_rank(dist, [1, 1], [5, 1, 6], [0, 0], [1, 1, 1], max_rank=10)
    assert cmc.shape == (10,)
    # Query 0 hits at rank 2, query 1 at rank 2 too (gallery reversed).
    np.testing.assert_array_equal(cmc, [0] + [1.0] * 9)
    dist2 = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    cmc2, _, _ = evaluate_rank(dist2, [1, 6], [1, 5, 6], [0, 0], [1, 1, 1], max_rank=5)
    np.testing.assert_array_equal(cmc2, [0.5, 0.5, 1.0, 1.0, 1.0])


def test_ties_are_broken_by_gallery_index() -> None:
    dist = np.zeros((1, 3))
    cmc, m_ap, _ = evaluate_rank(dist, [1], [2, 1, 3], [0], [1, 1, 1], max_rank=3)
    np.testing.assert_array_equal(cmc, [0, 1, 1])
    assert m_ap == pytest.approx(0.5)


def test_no_valid_query_raises() -> None:
    dist = np.zeros((2, 3))
    # Query pids absent from the gallery.
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(dist, [8, 9], [1, 2, 3], [0, 0], [0, 1, 2])
    # Only same-camera matches exist: all removed.
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(dist, [1, 1], [1, 1, 2], [0, 0], [0, 0, 1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"q_pids": [1, 2, 3]}, "q_pids"),
        ({"q_camids": [0]}, "q_camids"),
        ({"g_pids": [1, 2]}, "g_pids"),
        ({"g_camids": [0, 1, 2, 3]}, "g_camids"),
        ({"distmat": np.zeros(3)}, "distmat"),
        ({"q_pids": [[1], [2]]}, "q_pids"),
    ],
)
def test_shape_mismatch_names_argument(kwargs: dict, name: str) -> None:
    base = {
        "distmat": np.zeros((2, 3)),
        "q_pids": [1, 2],
        "g_pids": [1, 2, 3],
        "q_camids": [0, 0],
        "g_camids": [1, 1, 1],
    }
    base.update(kwargs)
    with pytest.raises(ValueError, match=name):
        evaluate_rank(**base)


def test_bad_max_rank_and_nan_raise() -> None:
    args = (np.zeros((1, 2)), [1], [1, 2], [0], [1, 1])
    with pytest.raises(ValueError, match="max_rank"):
        evaluate_rank(*args, max_rank=0)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(np.array([[np.nan, 0.0]]), *args[1:])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_compute_distance_matrix(metric: str) -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(13, 8)).astype(np.float32)
    g = rng.normal(size=(21, 8)).astype(np.float32)
    d = compute_distance_matrix(q, g, metric=metric, chunk_size=4)
    assert d.shape == (13, 21) and d.dtype == np.float32
    if metric == "euclidean":
        ref = np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    else:
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        ref = 1 - qn @ gn.T
    np.testing.assert_allclose(d, ref, atol=1e-4)
    # torch input and float64 are honoured.
    d_t = compute_distance_matrix(torch.from_numpy(q), torch.from_numpy(g), metric=metric)
    np.testing.assert_allclose(d_t, d, atol=1e-5)
    d64 = compute_distance_matrix(q.astype(np.float64), g.astype(np.float64), metric=metric)
    assert d64.dtype == np.float64
    # Self-distance is (close to) zero and never negative.
    self_d = compute_distance_matrix(q, q, metric=metric)
    assert (self_d >= 0).all()
    np.testing.assert_allclose(np.diag(self_d), 0, atol=1e-3)


def test_compute_distance_matrix_errors() -> None:
    with pytest.raises(ValueError, match="metric"):
        compute_distance_matrix(np.zeros((2, 3)), np.zeros((2, 3)), metric="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature dims"):
        compute_distance_matrix(np.zeros((2, 3)), np.zeros((2, 4)))
