"""No dense N x N array anywhere in the kNN graph, clustering or HDL (issue #6).

Each step runs on N = 20,000 rows under tracemalloc (numpy reports its buffers to it);
an N x N float32 array would be 20000^2 * 4 B = 1.6 GB, so a traced peak below a
tenth of that proves none was allocated (the real peak is tens of MB).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest



N = 20_000
LIMIT = N * N * 4 // 10  # 160 MB, a tenth of one N x N float32 array


def clustered(n=N, d=32, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    X = centres[y] + 0.8 * rng.standard_normal((n, d), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    ym = np.full(n, -1)
    lab = rng.choice(n, n // 100, replace=False)
    ym[lab] = y[lab]
    return X, y, ym


def traced_peak(fn, *args, **kw):
    tracemalloc.start()
    try:
        out = fn(*args, **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


def test_the_tracer_sees_an_n_by_n_allocation():
    # np.empty commits no pages, so this costs nothing, but tracemalloc records the 1.6 GB request
    _, peak = traced_peak(lambda: np.empty((N, N), np.float32).shape)
    assert peak >= N * N * 4


@pytest.fixture(scope="module")
def data():
    return clustered()


def test_knn_graphs_allocate_no_n_by_n(data):
    from ssl_pipeline.labeling.knn import ivf_knn_graph, knn_graph, knn_recall

    X, _, _ = data
    g, peak = traced_peak(knn_graph, X, 20, kind="flat")
    assert peak < LIMIT, f"exact kNN graph traced {peak / 1e6:.0f} MB"
    (g2, info), peak = traced_peak(ivf_knn_graph, X, 20, min_recall=0.9, recall_sample=300)
    assert peak < LIMIT, f"ivf kNN graph traced {peak / 1e6:.0f} MB"
    assert g2.idx.shape == (N, 20) and 1 <= info["nprobe"] <= info["nlist"]
    assert knn_recall(X, g2, sample=300, seed=1) >= 0.85
    assert not (g2.idx == np.arange(N)[:, None]).any()


def test_clustering_allocates_no_n_by_n(data):
    from ssl_pipeline.labeling.clustering import choose_n_clusters, kmeans
    from ssl_pipeline.labeling.knn import knn_graph

    X, _, _ = data
    g = knn_graph(X, 10)
    (nc, _), peak = traced_peak(choose_n_clusters, X, graph_idx=g.idx, seed=0)
    assert peak < LIMIT, f"choose_n_clusters traced {peak / 1e6:.0f} MB"
    (_, assign), peak = traced_peak(kmeans, X, nc, seed=0)
    assert peak < LIMIT, f"kmeans traced {peak / 1e6:.0f} MB"
    assert assign.shape == (N,)


def test_hdl_allocates_no_n_by_n(data):
    from ssl_pipeline.labeling.hdl import HDL
    from ssl_pipeline.labeling.knn import knn_graph

    X, y, ym = data
    g = knn_graph(X, 20)
    hdl, peak = traced_peak(HDL().fit, X, ym, neighbors=g)
    assert peak < LIMIT, f"HDL traced {peak / 1e6:.0f} MB"
    u = ym < 0
    assert (hdl.labels_[u] == y[u]).mean() > 0.9
