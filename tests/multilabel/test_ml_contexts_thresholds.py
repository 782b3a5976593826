"""Label contexts (co-occurrence + spectral clustering), class-aware thresholds and the pseudo-label steps."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_pipeline.multilabel.contexts import context_targets, cooccurrence, eigengap_contexts, spectral_contexts
from ssl_pipeline.multilabel.pseudo import knn_neighbours, knn_vote, make_pseudolabels
from ssl_pipeline.multilabel.thresholds import class_aware_pseudolabels, class_frequencies


def grouped_labels(n: int = 400, seed: int = 0) -> np.ndarray:
    """(n, 7) labels in three obvious groups {0,1,2}, {3,4}, {5,6}: an image draws its labels from one group."""
    rng = np.random.default_rng(seed)
    groups = [[0, 1, 2], [3, 4], [5, 6]]
    Y = np.zeros((n, 7), np.int8)
    for i in range(n):
        g = groups[rng.integers(3)]
        k = rng.integers(1, len(g) + 1)
        Y[i, rng.choice(g, k, replace=False)] = 1
    return Y


def test_cooccurrence_is_symmetric_normalised():
    Y = grouped_labels()
    A = cooccurrence(Y)
    assert A.shape == (7, 7) and np.allclose(A, A.T) and np.allclose(np.diag(A), 0)
    assert A.min() >= 0 and A.max() <= 1
    assert A[0, 1] > 0.2 and A[0, 3] == 0 and A[3, 5] == 0


def test_spectral_contexts_find_the_groups():
    context_of, info = spectral_contexts(grouped_labels())
    assert info["n_contexts"] == 3  # chosen by the eigengap
    assert len(set(context_of[[0, 1, 2]])) == 1 and len(set(context_of[[3, 4]])) == 1
    assert len(set(context_of[[5, 6]])) == 1 and len(set(context_of[[0, 3, 5]])) == 3
    assert list(context_of[[0, 3, 5]]) == [0, 1, 2]  # ids in order of first appearance


def test_context_count_bounds_and_fixed():
    Y = grouped_labels()
    assert spectral_contexts(Y, max_contexts=2)[1]["n_contexts"] == 2
    assert spectral_contexts(Y, n_contexts=5)[1]["n_contexts"] == 5
    m, lam = eigengap_contexts(cooccurrence(Y), 2, 3)
    assert m == 3 and np.all(np.diff(lam) >= -1e-9)


def test_isolated_label_and_tiny_label_sets():
    Y = np.zeros((30, 3), np.int8)
    Y[:10, 0] = 1
    Y[10:, 1] = Y[10:, 2] = 1  # label 0 never co-occurs
    context_of, info = spectral_contexts(Y)
    assert context_of[1] == context_of[2] != context_of[0]
    c1, _ = spectral_contexts(np.ones((5, 1), np.int8))
    assert list(c1) == [0]


def test_context_targets():
    Y = np.array([[1, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    t = context_targets(Y, np.array([0, 1, 1, 0]))
    assert t.tolist() == [[1, 0], [0, 1], [0, 0]]


def test_class_frequencies_smoothed_and_clipped():
    Y = np.zeros((20, 3), np.int8)
    Y[:10, 0] = 1
    Y[:1, 1] = 1
    pi = class_frequencies(Y, prior_strength=2.0)
    assert pi[0] < 0.5 and pi[1] > 1 / 20 and pi[2] > 0  # shrunk towards the mean, never 0
    assert pi.min() >= 1 / 21 and pi.max() <= 0.95
    assert np.allclose(class_frequencies(Y, prior_strength=0.0, low=0.0), [0.5, 0.05, 0.0])


def test_class_aware_thresholds_respect_frequencies_and_mask_the_band():
    rng = np.random.default_rng(0)
    N = 1000
    scores = rng.random((N, 3))
    pi = np.array([0.1, 0.3, 0.02])
    tau, decision, counted = class_aware_pseudolabels(scores, pi, band=0.2)
    assert decision.sum(0).tolist() == [100, 300, 20]  # exactly pi_k * N positives
    for k in range(3):
        assert np.all(scores[decision[:, k], k] >= tau[k]) and np.all(scores[~decision[:, k], k] <= tau[k])
    masked = ~counted
    assert masked.sum(0).tolist() == [40, 120, 8]  # ranks [(1-b) n_k, (1+b) n_k)
    for k in range(3):  # the masked entries are the ones closest to the cut
        order = np.argsort(-scores[:, k])
        n_k = int(pi[k] * N)
        assert masked[order[int(0.8 * n_k):int(np.ceil(1.2 * n_k))], k].all()
        assert counted[order[:int(0.8 * n_k)], k].all() and counted[order[int(np.ceil(1.2 * n_k)):], k].all()
    _, d0, c0 = class_aware_pseudolabels(scores, pi, band=0.0)
    assert c0.all() and (d0 == decision).all()
    with pytest.raises(ValueError):
        class_aware_pseudolabels(scores, pi, band=1.0)


def test_context_veto_removes_positives_outside_the_image_contexts():
    rng = np.random.default_rng(0)
    N = 200
    scores = rng.random((N, 4))
    context_of = np.array([0, 0, 1, 1])
    ctx_scores = np.zeros((N, 2))
    ctx_scores[:100, 0] = 1.0  # the first half is in context 0 only, the second half in context 1 only
    ctx_scores[100:, 1] = 1.0
    pl = make_pseudolabels(scores, np.full(4, 0.2), 0.1, context_of, ctx_scores, np.array([0.3, 0.3]), veto=True)
    assert not pl.decision[:100, 2:].any() and not pl.decision[100:, :2].any()
    assert pl.vetoed.any() and not (pl.vetoed & pl.counted).any()
    assert pl.contexts.shape == (N, 2) and (pl.contexts[:100, 1] == 0).all()
    off = make_pseudolabels(scores, np.full(4, 0.2), 0.1, context_of, ctx_scores, np.array([0.3, 0.3]), veto=False)
    assert not off.vetoed.any() and off.decision.sum() == 4 * 40


def test_knn_vote_smooths_towards_neighbours():
    rng = np.random.default_rng(0)
    centers = np.eye(4, 16)
    y = np.repeat(np.arange(4), 25)
    X = centers[y] + 0.05 * rng.standard_normal((100, 16))
    sims, idx = knn_neighbours(X, 5)
    assert sims.shape == (100, 5) and (idx != np.arange(100)[:, None]).all()
    assert (y[idx] == y[:, None]).all()
    T = np.eye(4)[y].astype(np.float32)
    T[:50] = 0.5  # unknown halves
    vote = knn_vote(T, sims, idx)
    assert vote.shape == (100, 4) and np.allclose(vote[50:], np.eye(4)[y[50:]], atol=0.35)


def test_graph_neighbours_take_the_cluster_graph_and_pad_missing_with_self():
    from ssl_pipeline.labeling.knn import KNNGraph
    from ssl_pipeline.multilabel.labeler import graph_neighbours

    g = KNNGraph(idx=np.array([[1, 2, -1], [0, -1, -1], [0, 1, -1]]),
                 sim=np.array([[0.9, 0.5, -np.inf], [0.9, -np.inf, -np.inf], [0.5, 0.4, -np.inf]], np.float32))
    sims, idx = graph_neighbours(g, 2)
    assert idx.tolist() == [[1, 2], [0, 1], [0, 1]]
    assert sims[1].tolist() == [pytest.approx(0.9), 0.0]  # the missing neighbour: itself, weight 0
