"""Neighbour search: exact below a size threshold (tiled numpy products, :func:`_top_k`), approximate above
(inverted lists from faiss k-means, or a faiss index).

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


def row_norms(X: NDArray, batch: int = 65536) -> NDArray[np.float32]:
    """L2 norm of every row of ``X`` (N, D) -> (N,) float32, in batches (no N x D temporary)."""
    out = np.empty(len(X), np.float32)
    for s in range(0, len(X), batch):
        b = np.asarray(X[s:s + batch], np.float32)
        out[s:s + len(b)] = np.sqrt(np.einsum("ij,ij->i", b, b))
    return out


def _unit_norms(X: NDArray) -> NDArray[np.float32]:
    """Row norms of ``X`` (N, D); ``ValueError`` on NaN/inf values or zero rows, which would silently break
    every similarity downstream."""
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N x D), got shape {X.shape}")
    norms = row_norms(X)
    if not np.isfinite(norms).all():
        raise ValueError(f"embeddings hold NaN or inf values in {int((~np.isfinite(norms)).sum())} rows")
    if (norms == 0).any():
        raise ValueError(f"embeddings hold {int((norms == 0).sum())} all-zero rows, which have no direction")
    return norms


def _normalised_copy(X: NDArray, norms: NDArray[np.float32]) -> NDArray[np.float32]:
    """One C-contiguous float32 copy of ``X`` with its rows divided by ``norms``, in place by batches."""
    out = np.array(X, dtype=np.float32, order="C")
    for s in range(0, len(out), 65536):
        out[s:s + 65536] /= norms[s:s + 65536, None]
    return out


def as_unit_rows(X: NDArray) -> NDArray:
    """``X`` (N, D) itself when its rows are already unit-norm float32 or float16 (a memory map stays a map,
    checked in batches, no copy); otherwise a normalised float32 copy, as :func:`as_unit_float32`.

    For code that reads rows in batches and casts them to float32 as it goes
    (kNN graphs, k-means, HDL), so float16 embedding shards are never copied whole.
    """
    if not (isinstance(X, np.ndarray) and X.dtype in (np.float16, np.float32)):
        return as_unit_float32(X)
    norms = _unit_norms(X)
    if len(X) and np.allclose(norms, 1.0, atol=1e-3 if X.dtype == np.float32 else 5e-3):
        return X
    return _normalised_copy(X, norms)


def as_float32(X: NDArray) -> NDArray[np.float32]:
    """A C-contiguous float32 view or copy of (a block of) rows."""
    return np.ascontiguousarray(X, dtype=np.float32)


def as_unit_float32(X: NDArray) -> NDArray[np.float32]:
    """Return ``X`` (N, D) as a C-contiguous float32 array with L2-normalised rows.

    An input that already is one is returned as is (checked in batches, no copy);
    otherwise one float32 copy is made and normalised in place. Raises
    ``ValueError`` on NaN/inf values or zero rows, which would silently break
    every similarity downstream.
    """
    if not (isinstance(X, np.ndarray) and X.dtype == np.float32 and X.flags.c_contiguous):
        X = np.asarray(X)
    norms = _unit_norms(X)
    if X.dtype == np.float32 and X.flags.c_contiguous and np.allclose(norms, 1.0, atol=1e-3):
        return X
    return _normalised_copy(X, norms)


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
        sample = as_float32(X[np.sort(rng.choice(n, min(n, 40 * nlist), replace=False))])
        index.cp.seed = int(seed)
        index.train(sample)
        index.nprobe = nprobe
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid: flat, ivf, hnsw")
    for s in range(0, n, 65536):  # float16 or memory-mapped rows are cast one batch at a time
        index.add(as_float32(X[s:s + 65536]))
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


def _drop_self(sim: NDArray, idx: NDArray, rows: NDArray, k: int) -> tuple[NDArray, NDArray]:
    """Remove each query's own id from its (k + 1)-long result list (else its last entry)."""
    is_self = idx == rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), -1] = False
    return sim[keep].reshape(len(rows), k), idx[keep].reshape(len(rows), k)


def _pad(g_idx: NDArray, g_sim: NDArray, k: int) -> KNNGraph:
    g_sim = np.where(g_idx < 0, -np.inf, g_sim).astype(np.float32)
    if g_idx.shape[1] < k:
        pad = k - g_idx.shape[1]
        g_idx = np.pad(g_idx, ((0, 0), (0, pad)), constant_values=-1)
        g_sim = np.pad(g_sim, ((0, 0), (0, pad)), constant_values=-np.inf)
    return KNNGraph(idx=g_idx, sim=g_sim)


def exact_search(X_index: NDArray, Q: NDArray, k: int, batch_size: int = 4096, block_rows: int = 262_144
                 ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Exact inner-product top-``k`` of the rows of ``Q`` among the rows of ``X_index``, without copying the
    index rows into an index (:func:`_top_k`): (sim (M, k) float32, idx (M, k) int64).

    A float16 or memory-mapped ``X_index`` of more than ``block_rows`` rows is searched one
    float32 block at a time (the blocks' top-``k`` lists merged), so it is never copied whole.
    """
    k = min(k, len(X_index))
    blocked = not (X_index.dtype == np.float32 and X_index.flags.c_contiguous) and len(X_index) > block_rows
    if not blocked:  # _top_k tiles both sides and casts query rows block by block itself
        if Q is X_index:  # the kNN graph's self-search: each off-diagonal tile's product serves both its blocks
            return _top_k_self(X_index, k)
        return _top_k(Q, X_index, k)
    step = 16 * batch_size  # fewer, larger query batches per pass over the index blocks
    sims, idxs = [], []
    for s in range(0, len(Q), step):
        q = as_float32(Q[s:s + step])
        parts_d, parts_i = [], []
        for b in range(0, len(X_index), block_rows):
            block = as_float32(X_index[b:b + block_rows])
            d_b, i_b = _top_k(q, block, k)
            parts_d.append(d_b)
            parts_i.append(i_b + b)
        D, Ix = np.concatenate(parts_d, axis=1), np.concatenate(parts_i, axis=1)
        top = np.argsort(-D, axis=1, kind="stable")[:, :k]
        sims.append(np.take_along_axis(D, top, axis=1))
        idxs.append(np.take_along_axis(Ix, top, axis=1))
    if not sims:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(sims), np.concatenate(idxs)


def knn_graph(X: NDArray, k: int, kind: str = "flat", index=None, **index_kw) -> KNNGraph:
    """The k-nearest-neighbour graph of the rows of ``X`` (N, D), self excluded.

    Exact duplicates of a point are kept as neighbours; only the point itself is
    removed (by id, not by distance). ``kind="ivf"`` without an ``index`` builds the
    graph with :func:`ivf_knn_graph` (blocked exact search inside probed lists).
    """
    X = as_unit_rows(X)
    n = len(X)
    if n < 2:
        raise ValueError(f"a kNN graph needs at least 2 points, got {n}")
    if index is None and kind == "ivf":
        return ivf_knn_graph(X, k, **index_kw)[0]
    k_eff = min(k, n - 1)
    if index is None and kind == "flat":
        sim, idx = exact_search(X, X, k_eff + 1)
    else:
        if index is None:
            index = build_index(X, kind=kind, **index_kw)
        sim, idx = search(index, X, k_eff + 1)
    sim, idx = _drop_self(sim, idx, np.arange(n), k_eff)
    return _pad(idx, sim, k)


def ivf_knn_params(n: int, nlist: int | None = None) -> int:
    """Number of coarse lists for :func:`ivf_knn_graph`: about sqrt(N), at least 1, at most N / 16."""
    return int(nlist or max(1, min(n // 16, round(np.sqrt(n)))))


def _top_k(Q: NDArray, B: NDArray, k: int, q_block: int = 1024, b_block: int = 4096
           ) -> tuple[NDArray, NDArray]:
    """The ``k`` largest inner products of each row of ``Q`` (M, D) with the rows of ``B`` (N, D), largest
    first: (sim (M, k) float32, position in B (M, k) int64), ``k`` capped at N.

    Tiled: one matrix product per (``q_block`` x ``b_block``) tile by numpy's BLAS (16 MB of similarities
    at most), each tile pushed into per-row top-``k`` heaps by faiss (``float_minheap_array_t.addn``, the
    selection ``faiss.knn`` uses, here on one thread: see below). Not ``faiss.knn`` itself: the OpenBLAS bundled
    with the faiss-cpu wheels (0.3.15) falls back to its generic Prescott kernels on CPUs it does not
    recognise (virtual machines reporting a plain "Intel Xeon Processor"); there the exact kNN graph of
    4k x 512 rows took 0.57 s through ``faiss.knn`` and 0.15 s this way, 20k x 512 rows 14.0 s and 3.4 s (one
    thread each; ``benchmarks/knn_speed.py``).
    """
    B = as_float32(B)
    n = len(B)
    k = min(k, n)
    sims = np.empty((len(Q), k), np.float32)
    idxs = np.empty((len(Q), k), np.int64)
    for qs in range(0, len(Q), q_block):
        q = as_float32(Q[qs:qs + q_block])
        d_q, i_q = sims[qs:qs + len(q)], idxs[qs:qs + len(q)]  # contiguous row blocks: the heaps' storage
        heaps = _heaps(d_q, i_q)
        for bs in range(0, n, b_block):
            _push(heaps, np.ascontiguousarray(q @ B[bs:bs + b_block].T, dtype=np.float32), 0, bs)
        _sort_heaps(d_q, i_q)
    return sims, idxs


def _top_k_self(X: NDArray, k: int, block: int = 2048) -> tuple[NDArray, NDArray]:
    """:func:`_top_k` of the rows of ``X`` (N, D) among themselves (each row's own entry included), computing
    each pair of ``block``-row blocks' product once: tile (i, j) feeds the heaps of block i's rows and, as
    its transpose, those of block j's, so the matrix products cost about half of ``_top_k(X, X, k)``'s."""
    X = as_float32(X)
    n = len(X)
    k = min(k, n)
    sims = np.empty((n, k), np.float32)
    idxs = np.empty((n, k), np.int64)
    heaps = _heaps(sims, idxs)
    for i in range(0, n, block):
        xi = X[i:i + block]
        for j in range(i, n, block):
            S = np.ascontiguousarray(xi @ X[j:j + block].T, dtype=np.float32)
            _push(heaps, S, i, j)
            if j > i:
                _push(heaps, _transpose(S), j, i)
    _sort_heaps(sims, idxs)
    return sims, idxs


def _transpose(S: NDArray[np.float32], rows: int = 32) -> NDArray[np.float32]:
    """``S.T`` as a C-contiguous copy, ``rows`` source rows at a time (2048 x 2048: 6 ms, against 30 ms for
    ``np.ascontiguousarray(S.T)``, which walks the source column by column)."""
    T = np.empty((S.shape[1], S.shape[0]), S.dtype)
    for a in range(0, len(S), rows):
        T[:, a:a + rows] = S[a:a + rows].T
    return T


def _heaps(sims: NDArray[np.float32], idxs: NDArray[np.int64]):
    """faiss min-heaps, one per row of ``sims`` / ``idxs`` (M, k) (their storage), filled with -inf / -1.

    A min-heap per row keeps the k largest; filled with -inf (equal entries: already a heap) and sorted by
    numpy at the end (:func:`_sort_heaps`), so faiss opens no OpenMP region (heapify / reorder would): its
    threads' spin-waits stalled numpy's BLAS threads between tiles (4.7x slower at 50k x 282 on 2 cores).
    """
    import faiss

    sims.fill(-np.inf)
    idxs.fill(-1)
    heaps = faiss.float_minheap_array_t()
    heaps.k, heaps.nh = sims.shape[1], sims.shape[0]
    heaps.val, heaps.ids = faiss.swig_ptr(sims), faiss.swig_ptr(idxs)
    return heaps


def _push(heaps, S: NDArray[np.float32], row0: int, col0: int) -> None:
    """Push the similarity tile ``S`` (heap rows ``row0 + i``, ids ``col0 + j``) into ``heaps``, at most
    100,000 entries a call (faiss's serial branch of ``addn``)."""
    import faiss

    step = max(1, 100_000 // S.shape[1])
    for r in range(0, len(S), step):
        rows = S[r:r + step]
        heaps.addn(S.shape[1], faiss.swig_ptr(rows), col0, row0 + r, len(rows))


def _sort_heaps(sims: NDArray[np.float32], idxs: NDArray[np.int64]) -> None:
    """Sort every row of the heaps' storage, largest first."""
    order = np.argsort(-sims, axis=1, kind="stable")
    sims[:] = np.take_along_axis(sims, order, axis=1)
    idxs[:] = np.take_along_axis(idxs, order, axis=1)


def ivf_knn_graph(X: NDArray, k: int, nlist: int | None = None, nprobe: int | None = None,
                  min_recall: float = 0.9, recall_sample: int = 1000, recall_k: int = 10, seed: int = 0,
                  train_iter: int = 10) -> tuple[KNNGraph, dict]:
    """Approximate kNN graph of the rows of ``X`` by blocked exact search inside inverted lists.

    The rows are split into ``nlist`` (~sqrt N) lists by spherical k-means trained on
    a sample; the rows of list ``c`` are compared, by one matrix product, with every
    row of the ``nprobe`` lists whose centroids are most similar to ``c``'s (``c``
    included). ``nprobe`` left at ``None`` is the smallest count whose recall@``recall_k``
    against exact search, on ``recall_sample`` seeded rows, reaches ``min_recall`` with
    a margin of one standard error of that sample mean (exact search inside the
    candidates makes that recall exactly computable from the lists alone). Memory is
    O(N k) plus one list's block; time ~ N * nprobe * N / nlist * D. Returns (graph,
    info) with ``info``: nlist, nprobe, the sample's recall at that nprobe
    (``recall_tuned``) and candidates per row.
    """
    import faiss

    X = as_unit_rows(X)
    n, d = X.shape
    k_eff = min(k, n - 1)
    nlist = min(ivf_knn_params(n, nlist), n)
    rng = np.random.default_rng(seed)
    # coarse lists
    if nlist > 1:
        m = min(n, 32 * nlist)
        sample = as_float32(X if m >= n else X[np.sort(rng.choice(n, m, replace=False))])
        km = faiss.Kmeans(d, nlist, niter=train_iter, seed=int(seed) + 1, spherical=True, verbose=False,
                          max_points_per_centroid=32, min_points_per_centroid=1)
        km.train(sample)
        del sample
        cent = np.ascontiguousarray(km.centroids, dtype=np.float32)
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        _, a = exact_search(cent, X, 1)
        assign = a[:, 0]
    else:
        cent = np.zeros((1, d), np.float32)
        assign = np.zeros(n, np.int64)
    order = np.argsort(assign, kind="stable")
    starts = np.searchsorted(assign[order], np.arange(nlist + 1))
    sizes = np.diff(starts)
    # probe order of every list: lists by centroid similarity, itself first
    G = cent @ cent.T
    G[np.arange(nlist), np.arange(nlist)] = np.inf
    G[:, sizes == 0] = -np.inf
    probe = np.argsort(-G, axis=1, kind="stable").astype(np.int64)
    del G
    # choose nprobe from the recall of a seeded sample against exact search
    tuned = None
    if nprobe is None or recall_sample > 0:
        kr = min(recall_k, k_eff)
        q = np.sort(rng.choice(n, min(recall_sample, n), replace=False)) if recall_sample > 0 else np.arange(0)
        if len(q):
            _, ex = exact_search(X, X[q], kr + 1)
            ex = _drop_self(np.zeros(ex.shape, np.float32), ex, q, kr)[1]
            rank = np.empty((len(q), nlist), np.int64)
            rank[np.arange(len(q))[:, None], probe[assign[q]]] = np.arange(nlist)
            nb_rank = np.take_along_axis(rank, assign[np.maximum(ex, 0)], axis=1)
            del rank
            # recall of every sampled row at every probe count p: share of its neighbours in its first p lists
            per_q = np.zeros((len(q), nlist), np.float32)
            ok = ex >= 0
            np.add.at(per_q, (np.nonzero(ok)[0], nb_rank[ok]), 1.0 / kr)
            np.cumsum(per_q, axis=1, out=per_q)
            mean = per_q.mean(axis=0)
            # the probe count whose recall minus one standard error (of the sampled rows' mean) reaches the target
            lower = mean - per_q.std(axis=0) / np.sqrt(len(q))
            del per_q
            if nprobe is None:
                nprobe = int(np.searchsorted(np.maximum.accumulate(lower), min_recall - 1e-9) + 1)
            tuned = float(mean[min(nprobe, nlist) - 1])
        elif nprobe is None:
            nprobe = nlist
    nprobe = int(max(1, min(nprobe, nlist)))
    # blocked exact search, one list at a time
    idx = np.full((n, k_eff), -1, np.int64)
    sim = np.full((n, k_eff), -np.inf, np.float32)
    n_cand = 0
    for c in range(nlist):
        if sizes[c] == 0:
            continue
        rows = order[starts[c]:starts[c + 1]]
        cand = np.concatenate([order[starts[p]:starts[p + 1]] for p in probe[c, :nprobe]])
        n_cand += len(rows) * len(cand)
        s, pos = _top_k(X[rows], X[cand], k_eff + 1)
        ids = cand[pos]
        if ids.shape[1] < k_eff + 1:  # fewer candidates than k + 1: pad before dropping self
            padw = k_eff + 1 - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, padw)), constant_values=-1)
            s = np.pad(s, ((0, 0), (0, padw)), constant_values=-np.inf)
        s, ids = _drop_self(s, ids, rows, k_eff)
        idx[rows], sim[rows] = ids, s
    info = {"nlist": nlist, "nprobe": nprobe, "recall_tuned": tuned, "candidates_per_row": n_cand / max(n, 1)}
    log.info("ivf kNN graph: %d lists, %d probed, %.0f candidates per row, sample recall@%d %s",
             nlist, nprobe, info["candidates_per_row"], recall_k, "n/a" if tuned is None else f"{tuned:.3f}")
    return _pad(idx, sim, k), info


def knn_recall(X: NDArray[np.float32], graph: KNNGraph, k: int = 10, sample: int = 1000, seed: int = 0) -> float:
    """Recall of ``graph``'s first ``k`` neighbours against exact search, on a seeded sample of rows.

    ``X`` (N, D) unit-norm float32 must be the rows the graph was built on.
    """
    n = len(X)
    k = min(k, graph.k, n - 1)
    q = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    _, idx = exact_search(X, X[q], k + 1)
    hits = 0
    for row, ex, ap in zip(q, idx, graph.idx[q, :k]):
        ex = ex[ex != row][:k]
        hits += len(np.intersect1d(ex, ap))
    return hits / (len(q) * k)


def nearest(X_index: NDArray, X_query: NDArray, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Exact cosine kNN of each query row among the index rows: (sim (M, k), idx (M, k))."""
    A = as_unit_float32(X_index)
    return exact_search(A, as_unit_float32(X_query), min(k, len(A)))
