"""Baseline labelers on blobs with known answers, and the shared faiss helpers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone

from ssl_pipeline.labeling.baselines import KNNVote, LabelSpreadingLabeler, Prototype
from ssl_pipeline.labeling.knn import knn_graph
from tests.conftest import blobs


def few_labels(y, n=2, seed=0):
    rng = np.random.default_rng(seed)
    m = np.zeros(len(y), bool)
    for c in np.unique(y):
        m[rng.choice(np.flatnonzero(y == c), n, replace=False)] = True
    return np.where(m, y, -1)


@pytest.mark.parametrize("cls", [KNNVote, Prototype, LabelSpreadingLabeler])
def test_baselines_label_every_row_of_separated_blobs(cls):
    X, y = blobs()
    yl = few_labels(y)
    lab = cls().fit(X, yl)
    assert lab.labels_.shape == y.shape and (lab.labels_ >= 0).all()
    assert (lab.labels_[yl >= 0] == y[yl >= 0]).all()
    assert (lab.labels_ == y).mean() > 0.95
    assert ((lab.confidence_ >= 0) & (lab.confidence_ <= 1)).all()
    assert (lab.predict(X[:10]) == y[:10]).mean() >= 0.9
    assert clone(lab).get_params() == lab.get_params()


def test_knn_graph_excludes_self_and_keeps_duplicates():
    X, _ = blobs(n_per_class=10, n_classes=2)
    X = np.concatenate([X, X[:1]])  # row 20 duplicates row 0
    g = knn_graph(X, 5)
    assert g.idx.shape == (21, 5)
    assert not (g.idx == np.arange(21)[:, None]).any()
    assert g.idx[0, 0] == 20 and g.idx[20, 0] == 0
    assert np.all(np.diff(g.sim, axis=1) <= 1e-6)


def test_knn_graph_pads_when_k_exceeds_points():
    X, _ = blobs(n_per_class=2, n_classes=2)
    g = knn_graph(X, 6)
    assert (g.idx[:, 3:] == -1).all() and np.isneginf(g.sim[:, 3:]).all()


def test_non_contiguous_class_ids_are_kept():
    X, y = blobs(n_classes=3)
    y = np.array([3, 7, 10])[y]
    lab = Prototype().fit(X, few_labels(y))
    assert set(np.unique(lab.labels_)) <= {3, 7, 10}


def test_approximate_graph_recall_is_measured_against_exact():
    from ssl_pipeline.labeling.knn import build_index, knn_recall

    X, _ = blobs(n_per_class=300, n_classes=5, dim=16, noise=0.4)
    exact = knn_graph(X, 10)
    assert knn_recall(X, exact, k=10, sample=200) == 1.0
    ivf = build_index(X, kind="ivf", nlist=32, nprobe=1)
    approx = knn_graph(X, 10, index=ivf)
    r1 = knn_recall(X, approx, k=10, sample=200)
    ivf.nprobe = 32
    r_all = knn_recall(X, knn_graph(X, 10, index=ivf), k=10, sample=200)
    assert r1 < r_all and r_all > 0.99


def test_modularity_prefers_the_true_partition():
    from ssl_pipeline.labeling.clustering import graph_modularity

    X, y = blobs(n_per_class=50, n_classes=4)
    g = knn_graph(X, 10)
    rng = np.random.default_rng(0)
    assert graph_modularity(g.idx, y) > 0.5 > graph_modularity(g.idx, rng.permutation(y))


def test_ivf_graph_tunes_its_probes_to_the_recall_target():
    from ssl_pipeline.labeling.knn import ivf_knn_graph, knn_recall

    X, _ = blobs(n_per_class=400, n_classes=5, dim=16, noise=0.4)
    for target in (0.8, 0.97):
        g, info = ivf_knn_graph(X, 10, nlist=40, min_recall=target, recall_sample=400, seed=0)
        assert g.idx.shape == (2000, 10) and not (g.idx == np.arange(2000)[:, None]).any()
        assert info["recall_tuned"] >= target
        assert knn_recall(X, g, k=10, sample=400, seed=5) >= target - 0.05
    g_all, info = ivf_knn_graph(X, 10, nlist=40, nprobe=40, recall_sample=0)
    assert knn_recall(X, g_all, k=10, sample=300) == 1.0 and info["recall_tuned"] is None
