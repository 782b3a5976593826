"""k-means with an automatically chosen number of clusters.

``choose_n_clusters`` fits spherical k-means (numpy Lloyd, :func:`lloyd_kmeans`) on a sample for a
geometric grid of cluster counts and keeps the count with the best score (graph modularity, or cosine
silhouette on a sub-sample); ``kmeans`` (faiss) fits on at most ``max_sample`` rows and assigns the rest
by nearest centroid, so memory stays O(N) whatever N is.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.labeling.knn import as_float32, as_unit_rows, exact_search

log = logging.getLogger(__name__)


def kmeans(X: NDArray, n_clusters: int, n_iter: int = 25, max_sample: int = 100_000, seed: int = 0,
           points_per_centroid: int = 64) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Spherical k-means: (centroids (K, D) unit rows, assignment (N,) int64).

    Fitted on a seeded sample of at most ``min(max_sample, points_per_centroid * K)``
    rows; every row is then assigned to its most similar centroid (batched exact search).
    """
    import faiss

    X = as_unit_rows(X)  # float16 / memory-mapped rows stay as they are; search() casts batches
    n, d = X.shape
    k = int(min(max(1, n_clusters), n))
    rng = np.random.default_rng(seed)
    max_sample = int(min(max_sample, max(points_per_centroid * k, 1000)))
    sample = as_float32(X if n <= max_sample else X[np.sort(rng.choice(n, max_sample, replace=False))])
    km = faiss.Kmeans(d, k, niter=n_iter, seed=int(seed) + 1, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, len(sample) // k + 1), min_points_per_centroid=1)
    km.train(sample)
    centroids = km.centroids / np.maximum(np.linalg.norm(km.centroids, axis=1, keepdims=True), 1e-12)
    _, assign = exact_search(centroids.astype(np.float32), X, 1)
    return centroids.astype(np.float32), assign[:, 0]


def lloyd_kmeans(X: NDArray, k: int, n_iter: int = 10, seed: int = 0, max_points_per_centroid: int = 256,
                 spherical: bool = False) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Euclidean k-means (Lloyd) by numpy's BLAS: (centroids (k, D) float32, assignment (N,) int64).

    ``spherical``: centroids are re-normalised after every update (spherical k-means of unit rows: the
    nearest centroid is then the most similar one).

    Trained on a seeded sample of at most ``k * max_points_per_centroid`` rows from ``k`` distinct seeded
    rows; an emptied cluster restarts at the sample row farthest from its centroid. Every row of ``X``
    (float16 or memory-mapped rows are read in batches) is then assigned to its nearest centroid. For the
    small in-fit clusterings of HDL (a few hundred clusters of 64-dim rows), where faiss's k-means ran on
    the slow generic kernels of the OpenBLAS in its wheels (see :func:`ssl_pipeline.labeling.knn._top_k`).
    """
    import scipy.sparse as sp

    n = len(X)
    k = int(min(max(1, k), n))
    rng = np.random.default_rng(seed)
    m = min(n, k * max_points_per_centroid)
    S = as_float32(X if m >= n else X[np.sort(rng.choice(n, m, replace=False))])
    C = S[np.sort(rng.choice(len(S), k, replace=False))].copy()
    ones = np.ones(len(S), np.float32)
    for _ in range(n_iter):
        a, d2 = _nearest_centroid(S, C)
        counts = np.bincount(a, minlength=k)
        C = np.asarray(sp.csr_matrix((ones, (a, np.arange(len(S)))), shape=(k, len(S))) @ S, np.float32)
        C /= np.maximum(counts, 1).astype(np.float32)[:, None]
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            C[empty] = S[np.argsort(-d2, kind="stable")[:len(empty)]]
        if spherical:
            C /= np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-12)
    return C, _nearest_centroid(X, C)[0]


def _nearest_centroid(X: NDArray, C: NDArray[np.float32], max_floats: int = 2 ** 22
                      ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Nearest row of ``C`` (k, D) to every row of ``X`` (N, D): (index (N,), squared distance (N,))."""
    cn = np.einsum("ij,ij->i", C, C)
    step = max(1, max_floats // max(len(C), 1))
    a = np.empty(len(X), np.int64)
    d2 = np.empty(len(X), np.float32)
    for s in range(0, len(X), step):
        xb = as_float32(X[s:s + step])
        G = xb @ C.T
        G *= -2.0
        G += cn
        a[s:s + len(xb)] = np.argmin(G, axis=1)
        d2[s:s + len(xb)] = G[np.arange(len(xb)), a[s:s + len(xb)]] + np.einsum("ij,ij->i", xb, xb)
    return a, d2


def silhouette_cosine(X: NDArray[np.float32], labels: NDArray, sample: int = 3000, seed: int = 0) -> float:
    """Mean cosine silhouette on a seeded sub-sample (O(sample^2) memory, never O(N^2))."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return -1.0
    n = len(X)
    idx = np.arange(n) if n <= sample else np.random.default_rng(seed).choice(n, sample, replace=False)
    if len(np.unique(labels[idx])) < 2:
        return -1.0
    return float(silhouette_score(X[idx], labels[idx], metric="cosine"))


def graph_modularity(idx: NDArray[np.int64], labels: NDArray, nodes: NDArray | None = None) -> float:
    """Newman modularity of a partition on a kNN graph (N, K), unweighted, estimated from ``nodes``' edges.

    Q = (share of edges inside clusters) - sum_c (share of edge ends in c)^2.
    ``labels`` must be defined (>= 0) for ``nodes`` and their neighbours;
    O(len(nodes) K) time and memory.
    """
    nodes = np.arange(len(idx)) if nodes is None else nodes
    sub = idx[nodes]
    valid = sub >= 0
    src = np.repeat(nodes, valid.sum(1))
    dst = sub[valid]
    inside = float((labels[src] == labels[dst]).mean())
    m = int(labels.max()) + 1
    deg = np.bincount(labels[src], minlength=m) + np.bincount(labels[dst], minlength=m)
    share = deg / deg.sum()
    return inside - float((share ** 2).sum())


def choose_n_clusters(X: NDArray, candidates: list[int] | None = None, max_sample: int = 20_000, seed: int = 0,
                      n_iter: int = 10, graph_idx: NDArray | None = None, max_nodes: int = 5000
                      ) -> tuple[int, dict[int, float]]:
    """Pick a cluster count; return (count, {count: score}).

    With ``graph_idx`` (the (N, K) kNN graph of ``X``) the score is the modularity
    of the k-means partition on that graph (clusters that the neighbourhoods
    agree with, with no bias towards 2 clusters); otherwise the cosine
    silhouette on a sub-sample. The grid is geometric from 2 up to
    ``min(2 sqrt(n), 1024)``; k-means runs on at most ``max_sample`` rows, modularity
    is estimated from the edges of ``max_nodes`` sampled nodes.
    """
    X = as_unit_rows(X)
    n = len(X)
    rng = np.random.default_rng(seed)
    S = as_float32(X if n <= max_sample else X[np.sort(rng.choice(n, max_sample, replace=False))])
    if candidates is None:
        hi = int(min(max(2, 2 * np.sqrt(len(S))), 1024, len(S) - 1))
        candidates = sorted({int(round(v)) for v in np.geomspace(2, max(hi, 2), num=10)})
    scores = {}
    if graph_idx is not None:
        # score on a node sample: only the sample and its neighbours need a cluster assignment
        nodes = np.sort(rng.choice(n, min(n, max_nodes), replace=False))
        nb = graph_idx[nodes]
        need = np.unique(np.concatenate([nodes, nb[nb >= 0]]))
        X_need = X[need]
    for k in candidates:
        if k < 2 or k >= len(S):
            continue
        # numpy's BLAS, not faiss's k-means: faiss opens OpenMP regions whose threads spin-wait, and on a busy
        # 2-core machine this scan took 1.2 of a 4k-row cluster stage's 2.0 s that way (on an idle one the two
        # are level: 0.27 vs 0.33 s); the OpenBLAS in faiss's wheels also runs generic kernels on CPUs it does
        # not recognise (knn._top_k)
        centroids, a_s = lloyd_kmeans(S, k, n_iter=n_iter, seed=seed, max_points_per_centroid=len(S), spherical=True)
        if graph_idx is not None:
            labels = np.full(n, -1, np.int64)
            _, a = exact_search(centroids, X_need, 1)
            labels[need] = a[:, 0]
            scores[k] = graph_modularity(graph_idx, labels, nodes)
        else:
            scores[k] = silhouette_cosine(S, a_s, seed=seed)
    if not scores:
        return 1, {}
    best = max(scores, key=scores.get)
    log.info("cluster: score by cluster count %s -> %d", {k: round(v, 3) for k, v in scores.items()}, best)
    return int(best), scores
