"""ANN hard-negative labels for UniDEC-style training (papers-digest section 3.5).

Every ``refresh_every`` epochs the training loop embeds all labels with the
current DE head and calls :meth:`HardNegativeMiner.refresh`; it then mines a
shortlist of hard negatives for the training queries with
:meth:`HardNegativeMiner.mine` and, per batch, turns positives plus sampled
shortlist entries into one shared label pool with
:meth:`HardNegativeMiner.batch_pool`::

    miner = HardNegativeMiner(refresh_every=2)
    for epoch in range(n_epochs):
        if miner.should_refresh(epoch):
            miner.refresh(embed_labels())                       # (L, D)
            shortlist = miner.mine(embed_queries(), positives, n_neg=32)
        for batch in batches:
            pool_ids, pos = miner.batch_pool([positives[i] for i in batch], shortlist[batch],
                                             n_per_query=4, rng=rng)
            loss = psl(q[batch], label_emb[pool_ids], torch.from_numpy(pos))

Vectors are float32 and L2-normalised, so the inner product is the cosine.
faiss is imported inside the methods that need it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

log = logging.getLogger(__name__)

__all__ = ["HardNegativeMiner"]


def _unit_float32(X: ArrayLike) -> NDArray[np.float32]:
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (N, D), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("embeddings hold NaN or inf values")
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"embeddings hold {int((norms == 0).sum())} all-zero rows")
    return np.ascontiguousarray(X / norms, dtype=np.float32)


def _as_id_lists(ids: Sequence[ArrayLike]) -> list[NDArray[np.int64]]:
    return [np.asarray(p, dtype=np.int64).reshape(-1) for p in ids]


class HardNegativeMiner:
    """Mine hard negative labels from an ANN index over the label embeddings.

    Parameters
    ----------
    refresh_every : int
        Rebuild the index every this many epochs (``epsilon``); see
        :meth:`should_refresh`.
    index_kind : {"auto", "flat", "hnsw"}
        ``auto``: exact ``IndexFlatIP`` up to ``hnsw_threshold`` labels, HNSW above.
    hnsw_threshold : int
        Label count above which ``auto`` switches to HNSW.
    hnsw_m, ef_construction, ef_search : int
        HNSW graph degree and build / search beam widths.
    exclude_top : int
        Skip this many of the nearest non-positive labels of each query: with
        partial labels the very nearest "negatives" are often missing positives.

    Attributes
    ----------
    index_ : faiss index over the label embeddings (after :meth:`refresh`)
    n_labels_ : int
    index_kind_ : str, ``"flat"`` or ``"hnsw"``
    n_refreshes_ : int, how many times :meth:`refresh` was called
    last_stats_ : dict from the last :meth:`mine`:
        ``hit_rate`` share of queries with >= 1 positive among their ``n_neg``
        nearest labels; ``r_precision`` mean share of a query's positives among its
        ``|P_i|`` nearest labels (both say how well the index ranks true labels:
        they fall when the index is stale or the DE head is weak);
        ``n_short`` queries that got fewer than ``n_neg`` negatives.
    """

    def __init__(self, refresh_every: int = 1, index_kind: str = "auto", hnsw_threshold: int = 100_000,
                 hnsw_m: int = 32, ef_construction: int = 80, ef_search: int = 128,
                 exclude_top: int = 0) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if index_kind not in ("auto", "flat", "hnsw"):
            raise ValueError(f"unknown index_kind {index_kind!r}; valid: auto, flat, hnsw")
        if exclude_top < 0:
            raise ValueError(f"exclude_top must be >= 0, got {exclude_top}")
        self.refresh_every = refresh_every
        self.index_kind = index_kind
        self.hnsw_threshold = hnsw_threshold
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.exclude_top = exclude_top
        self.n_refreshes_ = 0
        self.last_stats_: dict[str, float] = {}

    # -- index -------------------------------------------------------------------------

    def should_refresh(self, epoch: int) -> bool:
        """True at epoch 0, ``refresh_every``, ``2 * refresh_every``, ... (0-based epochs)."""
        return epoch % self.refresh_every == 0

    def refresh(self, label_emb: ArrayLike) -> HardNegativeMiner:
        """(Re)build the index over ``label_emb`` (L, D); row l is label id l. Returns self."""
        import faiss

        X = _unit_float32(label_emb)
        n, d = X.shape
        kind = self.index_kind
        if kind == "auto":
            kind = "hnsw" if n > self.hnsw_threshold else "flat"
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            index = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
        index.add(X)
        self.index_ = index
        self.index_kind_ = kind
        self.n_labels_ = n
        self.n_refreshes_ += 1
        log.debug("hard-negative index #%d: %s over %d labels", self.n_refreshes_, kind, n)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "index_"):
            raise RuntimeError("call refresh(label_emb) before mining")

    def search(self, query_emb: ArrayLike, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        """The ``k`` nearest labels of each query: (sim (B, k) float32, ids (B, k) int64, -1 = none)."""
        self._check_fitted()
        Q = _unit_float32(query_emb)
        k = min(k, self.n_labels_)
        if self.index_kind_ == "hnsw":
            self.index_.hnsw.efSearch = max(self.ef_search, k)
        sim, ids = self.index_.search(Q, k)
        return sim.astype(np.float32), ids.astype(np.int64)

    # -- mining ------------------------------------------------------------------------

    def mine(self, query_emb: ArrayLike, positives: Sequence[ArrayLike], n_neg: int,
             chunk: int = 4096) -> NDArray[np.int64]:
        """Hard negatives of each query: its nearest labels that are not its positives.

        Parameters
        ----------
        query_emb : (B, D) query embeddings (DE head), any scale
        positives : B arrays of label ids, the positives of each query
        n_neg : negatives wanted per query
        chunk : queries searched per faiss call

        Returns
        -------
        (B, n_neg) int64 label ids, nearest first, never a positive of that query;
        -1 pads rows when fewer labels are left (tiny label spaces).
        """
        self._check_fitted()
        Q = _unit_float32(query_emb)
        pos = _as_id_lists(positives)
        if len(pos) != len(Q):
            raise ValueError(f"positives has {len(pos)} entries for {len(Q)} queries")
        if n_neg < 1:
            raise ValueError(f"n_neg must be >= 1, got {n_neg}")
        bad = [i for i, p in enumerate(pos) if len(p) and (p.min() < 0 or p.max() >= self.n_labels_)]
        if bad:
            raise ValueError(f"positives of {len(bad)} queries (first: {bad[0]}) lie outside the "
                             f"{self.n_labels_} indexed labels")
        out = np.full((len(Q), n_neg), -1, np.int64)
        hits, rprec, n_short, n_with_pos = 0, 0.0, 0, 0
        for s in range(0, len(Q), chunk):
            rows = np.arange(s, min(s + chunk, len(Q)))
            neg, h, r, short, npos = self._mine_rows(Q[rows], [pos[i] for i in rows], n_neg)
            out[rows] = neg
            hits, rprec, n_short, n_with_pos = hits + h, rprec + r, n_short + short, n_with_pos + npos
        self.last_stats_ = {
            "hit_rate": hits / max(n_with_pos, 1),
            "r_precision": rprec / max(n_with_pos, 1),
            "n_short": float(n_short),
        }
        log.debug("hard-negative mining: %s", self.last_stats_)
        return out

    def _mine_rows(self, Q: NDArray[np.float32], pos: list[NDArray[np.int64]], n_neg: int):
        b = len(Q)
        max_pos = max((len(p) for p in pos), default=0)
        n_pos = np.array([len(np.unique(p)) for p in pos], np.int64)
        # membership test "id in positives of row i" as one sorted lookup on (row, id) keys
        stride = np.int64(self.n_labels_ + 1)
        pos_keys = np.unique(np.concatenate([i * stride + p for i, p in enumerate(pos)] or [np.zeros(0, np.int64)]))
        need = n_neg + self.exclude_top
        k = min(self.n_labels_, need + max_pos)
        out = np.full((b, n_neg), -1, np.int64)
        todo = np.arange(b)
        hits, rprec = 0, 0.0
        first = True
        while len(todo):
            _, ids = self.search(Q[todo], k)
            is_pos = np.isin(todo[:, None] * stride + ids, pos_keys) & (ids >= 0)
            if first:   # retrieval quality of the current index, on the first (widest) pass
                has = n_pos[todo] > 0
                top_n = is_pos[:, :n_neg].any(1)
                hits += int(top_n[has].sum())
                rank = np.arange(ids.shape[1])[None, :]
                in_r = (is_pos & (rank < n_pos[todo, None])).sum(1)
                rprec += float((in_r[has] / n_pos[todo][has]).sum())
                first = False
            keep = ~is_pos & (ids >= 0)
            order = np.cumsum(keep, axis=1)
            keep &= (order > self.exclude_top) & (order <= need)
            got = keep.sum(1)
            done = (got >= n_neg) | (k >= self.n_labels_)
            # move kept ids to the front of each row, preserving their order
            front = np.argsort(~keep, axis=1, kind="stable")[:, :n_neg]
            chosen = np.take_along_axis(ids, front, axis=1)
            chosen_ok = np.take_along_axis(keep, front, axis=1)
            w = chosen.shape[1]  # < n_neg when the index holds fewer labels than asked for
            out[todo[done], :w] = np.where(chosen_ok, chosen, -1)[done]
            todo = todo[~done]
            k = min(self.n_labels_, 2 * k)
        n_short = int((out < 0).any(1).sum())
        return out, hits, rprec, n_short, int((n_pos > 0).sum())

    # -- batch label pool --------------------------------------------------------------

    @staticmethod
    def batch_pool(batch_positive_ids: Sequence[ArrayLike], hard_negative_ids: ArrayLike | None = None,
                   n_per_query: int | None = None, rng: np.random.Generator | None = None,
                   max_pos_per_query: int | None = None) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        """Shared in-batch label pool and its positive mask.

        Parameters
        ----------
        batch_positive_ids : B arrays, the positive label ids of each query of the batch
        hard_negative_ids : (B, K) int ids (-1 = none) or B arrays, optional; None
            gives a pool of the batch's positives only (in-batch negatives)
        n_per_query : sample this many of each query's hard negatives (``eta``)
            with ``rng``; None takes them all
        rng : numpy Generator for the sampling (default: seed 0)
        max_pos_per_query : put at most this many (sampled) positives of each
            query into the pool; None puts all of them

        Returns
        -------
        pool_ids : (P,) int64, sorted unique label ids
        pos_mask : (B, P) bool, ``pos_mask[i, p]`` = ``pool_ids[p]`` is a positive
            of query i. It marks every positive of i present in the pool, also one
            that entered as another query's positive or hard negative, so it is
            never used as a negative of i.
        """
        rng = rng if rng is not None else np.random.default_rng(0)
        pos = _as_id_lists(batch_positive_ids)
        parts = []
        for p in pos:
            if max_pos_per_query is not None and len(p) > max_pos_per_query:
                p = rng.choice(p, max_pos_per_query, replace=False)
            parts.append(p)
        if hard_negative_ids is not None:
            negs = _as_id_lists(list(hard_negative_ids))
            if len(negs) != len(pos):
                raise ValueError(f"hard_negative_ids has {len(negs)} rows for {len(pos)} queries")
            for h in negs:
                h = h[h >= 0]
                if n_per_query is not None and len(h) > n_per_query:
                    h = rng.choice(h, n_per_query, replace=False)
                parts.append(h)
        pool = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        mask = np.zeros((len(pos), len(pool)), bool)
        for i, p in enumerate(pos):
            j = np.searchsorted(pool, p)
            ok = j < len(pool)
            ok[ok] &= pool[j[ok]] == p[ok]
            mask[i, j[ok]] = True
        return pool.astype(np.int64), mask
