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


def _store(tmp_path, X, shard_rows):
    """An encode artifact holding ``X`` as float16 shards of ``shard_rows`` rows."""
    from ssl_pipeline.stages.encode import EmbeddingStore

    d = tmp_path / "enc"
    (d / "shards").mkdir(parents=True)
    for s, start in enumerate(range(0, len(X), shard_rows)):
        np.save(d / "shards" / f"emb_{s:05d}.npy", X[start:start + shard_rows].astype(np.float16))
        np.save(d / "shards" / f"rows_{s:05d}.npy", np.arange(start, min(start + shard_rows, len(X))))
    return EmbeddingStore(d)


@pytest.mark.parametrize("shard_rows", [1000, 300])
def test_store_matrix_is_one_float16_memory_map(tmp_path, shard_rows):
    from ssl_pipeline.stages.cluster import load_rows

    X = clustered(n=1000)[0]
    store = _store(tmp_path, X, shard_rows)
    M = store.matrix()
    assert isinstance(M, np.memmap) and M.dtype == np.float16 and M.shape == X.shape
    np.testing.assert_allclose(M, X, atol=1e-3)
    assert isinstance(load_rows(store, np.arange(1000)), np.memmap)  # all rows: the map itself, no copy
    sub = load_rows(store, np.array([5, 900, 17]))
    np.testing.assert_allclose(sub, X[[5, 900, 17]], atol=1e-3)
    with pytest.raises(ValueError, match="outside"):
        load_rows(store, np.array([1000]))


def test_store_matrix_rejects_a_stale_consolidated_file(tmp_path):
    from ssl_pipeline.errors import DataError

    store = _store(tmp_path, clustered(n=600)[0], 200)
    np.save(store.path / "embeddings.npy", np.zeros((5, 32), np.float16))
    with pytest.raises(DataError, match="delete it"):
        store.matrix()


def test_float16_rows_give_the_float32_graph_and_labels():
    from ssl_pipeline.labeling.hdl import HDL
    from ssl_pipeline.labeling.knn import ivf_knn_graph, knn_recall

    X, y, ym = clustered(n=6000)
    H = X.astype(np.float16)
    g32, _ = ivf_knn_graph(X, 10, nprobe=4, recall_sample=0)
    g16, _ = ivf_knn_graph(H, 10, nprobe=4, recall_sample=0)
    assert g16.idx.shape == g32.idx.shape
    assert knn_recall(X, g16, sample=300) >= knn_recall(X, g32, sample=300) - 0.02
    a32 = (HDL(random_state=0).fit(X, ym, neighbors=g32).labels_ == y).mean()
    a16 = (HDL(random_state=0).fit(H, ym, neighbors=g16).labels_ == y).mean()
    assert abs(a32 - a16) < 0.01


def test_an_embeddings_run_loads_neither_torch_nor_lightning(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    X, y, ym = clustered(n=2000, d=16)
    f = tmp_path / "e.npz"
    np.savez(f, X=X, y=ym, y_true=y)
    code = ("import sys; from tests.conftest import make_config; from ssl_pipeline import pipeline; "
            f"cfg = make_config('data=embeddings', 'data.path={f}', 'stage=pseudolabel', 'pseudolabel=hdl', "
            f"cache_dir=__import__('pathlib').Path('{tmp_path / 'cache'}')); "
            f"m = pipeline.run(cfg, '{tmp_path / 'run'}'); "
            "assert m['pseudolabel/accuracy'] > 0.8, m; "
            "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'torch or lightning imported'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
