"""The numpy exact top-k search and the numpy Lloyd k-means that replaced faiss's flat search and k-means in
HDL's fit (faiss's bundled OpenBLAS runs generic kernels on unrecognised CPUs)."""

import numpy as np
import pytest

from ssl_pipeline.labeling.clustering import lloyd_kmeans
from ssl_pipeline.labeling.knn import _top_k, _top_k_self, _transpose, exact_search, knn_graph


def _unit(rng, n, d):
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


@pytest.mark.parametrize("blocks", [(1024, 4096), (7, 3), (10, 20)])  # one tile; tiles narrower than k; many
def test_top_k_matches_a_full_sort(blocks):
    rng = np.random.default_rng(0)
    Q, B = _unit(rng, 53, 16), _unit(rng, 71, 16)
    sim, pos = _top_k(Q, B, 5, q_block=blocks[0], b_block=blocks[1])
    full = Q @ B.T
    want = np.argsort(-full, axis=1)[:, :5]
    assert sim.shape == pos.shape == (53, 5) and sim.dtype == np.float32 and pos.dtype == np.int64
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_allclose(sim, np.take_along_axis(full, want, axis=1), rtol=1e-5)
    assert (np.diff(sim, axis=1) <= 0).all()


@pytest.mark.parametrize("block", [2048, 16, 7])  # one block; blocks of unequal size (the last shorter); many
def test_self_search_matches_the_one_sided_search(block):
    # each off-diagonal tile's product serves both blocks (its transpose feeds the second)
    rng = np.random.default_rng(3)
    X = _unit(rng, 61, 16)
    sim, pos = _top_k_self(X, 5, block=block)
    want_sim, want_pos = _top_k(X, X, 5)
    np.testing.assert_array_equal(pos, want_pos)
    np.testing.assert_allclose(sim, want_sim, rtol=1e-5)
    assert exact_search(X, X, 5)[1].tolist() == want_pos.tolist()  # the self-search path of exact_search
    S = rng.standard_normal((70, 45)).astype(np.float32)
    assert np.array_equal(_transpose(S, rows=32), S.T) and _transpose(S).flags.c_contiguous


def test_top_k_caps_k_at_the_index_size_and_reads_float16():
    rng = np.random.default_rng(1)
    Q, B = _unit(rng, 7, 8), _unit(rng, 4, 8)
    sim, pos = _top_k(Q.astype(np.float16), B, 10)
    assert pos.shape == (7, 4)
    np.testing.assert_array_equal(np.sort(pos, axis=1), np.tile(np.arange(4), (7, 1)))


def test_exact_search_blocked_path_equals_the_plain_one():
    rng = np.random.default_rng(2)
    X = _unit(rng, 300, 12)
    plain = exact_search(X, X[:40], 6)
    blocked = exact_search(X.astype(np.float16), X[:40], 6, block_rows=64)  # float16 index: blocked search
    np.testing.assert_array_equal(plain[1][:, 0], np.arange(40))  # each row is its own nearest
    assert (plain[1] == blocked[1]).mean() > 0.95  # float16 rounding may swap near ties


def test_knn_graph_drops_self():
    rng = np.random.default_rng(3)
    X = _unit(rng, 100, 10)
    g = knn_graph(X, 4)
    assert g.idx.shape == (100, 4) and not (g.idx == np.arange(100)[:, None]).any()


def test_lloyd_kmeans_recovers_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(4)
    centres = 10 * rng.standard_normal((5, 8)).astype(np.float32)
    truth = np.repeat(np.arange(5), 60)
    X = centres[truth] + 0.1 * rng.standard_normal((300, 8)).astype(np.float32)
    C, a = lloyd_kmeans(X, 5, n_iter=20, seed=0)
    assert C.shape == (5, 8) and a.shape == (300,) and a.dtype == np.int64
    # every blob is one cluster (up to relabelling) or, at worst, one blob split and two merged: check purity
    purity = sum(np.bincount(truth[a == c]).max() for c in np.unique(a)) / len(a)
    assert purity >= 0.8
    C2, a2 = lloyd_kmeans(X, 5, n_iter=20, seed=0)
    np.testing.assert_array_equal(a, a2)


def test_lloyd_kmeans_uses_the_distinct_points_and_caps_k():
    X = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct points, 10 copies each
    X[0] += 0.5  # one row off its copies: a fourth distinct point
    C, a = lloyd_kmeans(X, 4, n_iter=5, seed=0)
    assert len(np.unique(a)) >= 3
    C, a = lloyd_kmeans(X[:2], 5, n_iter=2, seed=0)
    assert C.shape == (2, 3)


def test_lloyd_kmeans_restart_recovers_a_cluster_its_seeds_missed():
    # 29 copies of one point and one other point: seed 0 starts both centroids on copies of the first (rows 19
    # and 24), so the second cluster empties at once; only the restart at the farthest row finds the lone point
    # (far from the origin, where an emptied cluster's zero centroid would sit and could catch a row by luck)
    X = np.full((30, 2), 10.0, np.float32)
    X[0] = [10.0, 11.0]
    C, a = lloyd_kmeans(X, 2, n_iter=3, seed=0)
    assert a[0] != a[1] and (a[1:] == a[1]).all()
    np.testing.assert_allclose(C[a[0]], [10.0, 11.0], atol=1e-5)
    np.testing.assert_allclose(C[a[1]], [10.0, 10.0], atol=1e-5)
