"""Neighbour search with faiss: exact below a size threshold, approximate above.

All vectors are float32 and L2-normalised, so inner product equals cosine
similarity. faiss is imported inside the functions that need it (importing it at
module top next to torch can clash over OpenMP runtimes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

log = logging.getLogger(__name__)


@dataclass
class KNNGraph:
    """A k-nearest-neighbour graph over N points, self excluded.

    Attributes
    ----------
    idx : (N, K) int64
        Row i holds the ids of the K nearest other points of i, nearest first;
        -1 where fewer than K neighbours exist.
    sim : (N, K) float32
        Cosine similarity of those neighbours (``-inf`` where ``idx`` is -1).
    """

    idx: NDArray[np.int64]
    sim: NDArray[np.float32]

    @property
    def k(self) -> int:
        return int(self.idx.shape[1])

    def truncate(self, k: int) -> KNNGraph:
        """The same graph with only the ``k`` nearest neighbours of each point."""
        if k > self.k:
            raise ValueError(f"the stored graph has {self.k} neighbours per point, {k} were asked for")
        return KNNGraph(self.idx[:, :k], self.sim[:, :k])


def as_unit_float32(X: NDArray) -> NDArray[np.float32]:
    """Return ``X`` (N, D) as a C-contiguous float32 array with L2-normalised rows.

    Raises ``ValueError`` on NaN/inf values or zero rows, which would silently
    break every similarity downstream.
    """
    if isinstance(X, np.ndarray) and X.dtype == np.float32 and X.flags.c_contiguous and X.ndim == 2 and len(X) \
            and np.isfinite(X[:1000]).all() and np.allclose(np.linalg.norm(X[:1000], axis=1), 1.0, atol=1e-3):
        # already unit-norm float32 (checked on a prefix, then fully): no copy for large arrays
        norms = np.linalg.norm(X, axis=1)
        if np.isfinite(norms).all() and np.allclose(norms, 1.0, atol=1e-3):
            return X
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N x D), got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise ValueError(f"embeddings hold NaN or inf values in {bad} rows")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"embeddings hold {int((norms == 0).sum())} all-zero rows, which have no direction")
    return np.ascontiguousarray(X / norms, dtype=np.float32)


def ivf_params(n: int, nlist: int | None = None, nprobe: int | None = None) -> tuple[int, int]:
    """IVF list count ~ sqrt(N) (trained on 40 points per list) and probes ~ nlist / 32 (at least 8)."""
    nlist = int(nlist or max(16, min(65536, round(np.sqrt(n)))))
    nprobe = int(nprobe or min(nlist, max(8, nlist // 32)))
    return nlist, nprobe


def build_index(X: NDArray[np.float32], kind: str = "flat", nlist: int | None = None, nprobe: int | None = None,
                hnsw_m: int = 32, seed: int = 0):
    """Build a faiss inner-product index over the rows of ``X`` (N, D), unit-norm float32.

    ``kind`` is ``flat`` (exact), ``ivf`` (inverted lists, trained on a sample)
    or ``hnsw``. Parameters left at ``None`` are derived from N.
    """
    import faiss

    n, d = X.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist, nprobe = ivf_params(n, nlist, nprobe)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = X[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))]
        index.cp.seed = int(seed)
        index.train(sample)
        index.nprobe = nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid: flat, ivf, hnsw")
    index.add(X)
    return index


def search(index, Q: NDArray[np.float32], k: int, batch_size: int = 16384) -> tuple[NDArray, NDArray]:
    """Search ``Q`` (M, D) in ``index``; return (sim (M, k) float32, idx (M, k) int64)."""
    sims, idxs = [], []
    for s in range(0, len(Q), batch_size):
        D, Ix = index.search(np.ascontiguousarray(Q[s:s + batch_size], dtype=np.float32), k)
        sims.append(D.astype(np.float32))
        idxs.append(Ix.astype(np.int64))
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(idxs)


def knn_graph(X: NDArray, k: int, kind: str = "flat", index=None, **index_kw) -> KNNGraph:
    """The k-nearest-neighbour graph of the rows of ``X`` (N, D), self excluded.

    Exact duplicates of a point are kept as neighbours; only the point itself is
    removed (by id, not by distance).
    """
    X = as_unit_float32(X)
    n = len(X)
    if n < 2:
        raise ValueError(f"a kNN graph needs at least 2 points, got {n}")
    k_eff = min(k, n - 1)
    if index is None:
        index = build_index(X, kind=kind, **index_kw)
    sim, idx = search(index, X, k_eff + 1)
    # drop self: where the point appears in its own list remove it, else drop the last column
    rows = np.arange(n)[:, None]
    is_self = idx == rows
    has_self = is_self.any(axis=1)
    keep = ~is_self
    keep[~has_self, -1] = False
    idx = idx[keep].reshape(n, k_eff)
    sim = sim[keep].reshape(n, k_eff)
    sim = np.where(idx < 0, -np.inf, sim).astype(np.float32)
    if k_eff < k:
        pad = k - k_eff
        idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
        sim = np.pad(sim, ((0, 0), (0, pad)), constant_values=-np.inf)
    return KNNGraph(idx=idx, sim=sim)


def knn_recall(X: NDArray[np.float32], graph: KNNGraph, k: int = 10, sample: int = 1000, seed: int = 0) -> float:
    """Recall of ``graph``'s first ``k`` neighbours against exact search, on a seeded sample of rows.

    ``X`` (N, D) unit-norm float32 must be the rows the graph was built on.
    """
    n = len(X)
    k = min(k, graph.k, n - 1)
    q = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    exact = build_index(X, kind="flat")
    _, idx = search(exact, X[q], k + 1)
    hits = 0
    for row, ex, ap in zip(q, idx, graph.idx[q, :k]):
        ex = ex[ex != row][:k]
        hits += len(np.intersect1d(ex, ap))
    return hits / (len(q) * k)


def nearest(X_index: NDArray, X_query: NDArray, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Exact cosine kNN of each query row among the index rows: (sim (M, k), idx (M, k))."""
    A = as_unit_float32(X_index)
    index = build_index(A, kind="flat")
    return search(index, as_unit_float32(X_query), min(k, len(A)))
