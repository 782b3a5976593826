"""Multi-label pseudo-labels: teacher scores -> kNN smoothing -> class-aware thresholds -> context veto.

1. **Scores.** The (EMA) teacher head's sigmoid scores on the unlabeled images.
2. **Neighbourhood vote** (in the spirit of HDL: embeddings, not logits, carry
   the structure). Over the pooled embeddings of all train images, each
   unlabeled image averages its k nearest neighbours' label vectors, weighted
   by ``max(cos, 0) ** power``: the truth for labeled neighbours, the teacher's
   scores for unlabeled ones. ``p <- (1 - alpha) p + alpha vote``.
3. **Class-aware thresholds** (:mod:`.thresholds`): per class, the top
   ``pi_k N_u`` scores are positive, with an uncertain band masked out.
4. **Context veto.** A pseudo-positive of label k is vetoed (turned negative
   and masked) when the context head does not put the image in k's context:
   the image's context score is below the class-aware threshold of that context
   computed with a generous frequency ``(1 + band) pi_m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.multilabel.thresholds import class_aware_pseudolabels


@dataclass
class PseudoLabels:
    """Pseudo-labels of the N_u unlabeled images over C labels.

    Attributes
    ----------
    scores : (N_u, C) float32, smoothed scores in [0, 1]
    decision : (N_u, C) bool, True = positive
    counted : (N_u, C) bool, True = the entry trains the model (outside the band, not vetoed)
    vetoed : (N_u, C) bool, positives removed by the context veto
    tau : (C,) thresholds (score of the last positive)
    contexts : (N_u, M) float32, context targets (any positive label of the context)
    """

    scores: NDArray
    decision: NDArray
    counted: NDArray
    vetoed: NDArray
    tau: NDArray
    contexts: NDArray

    @property
    def masked(self) -> NDArray:
        return ~self.counted

    def certainty(self) -> NDArray:
        """(N_u,) mean over labels of the score's distance from the decision: p if positive else 1 - p."""
        s = np.where(self.decision, self.scores, 1.0 - self.scores)
        return s.mean(1)


def knn_neighbours(X: NDArray, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Cosine k nearest neighbours of each row of ``X`` (n, D) among the others: (sims (n, k'), idx (n, k')).

    Exact inner-product search (faiss ``IndexFlatIP``) on L2-normalised float32
    rows; HNSW above 200,000 rows. ``k' = min(k, n - 1)``.
    """
    import faiss

    X = np.ascontiguousarray(X, np.float32)
    X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    n = len(X)
    k = int(min(k, n - 1))
    if k < 1:
        return np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    if n > 200_000:
        index = faiss.IndexHNSWFlat(X.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(64, 2 * k)
    else:
        index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    sims, nbrs = index.search(X, k + 1)
    # drop self-matches (usually column 0; duplicates may move it)
    out_d = np.zeros((n, k), np.float32)
    out_i = np.zeros((n, k), np.int64)
    for r in range(n):
        keep = nbrs[r] != r
        d, i = sims[r][keep][:k], nbrs[r][keep][:k]
        out_d[r, :len(d)], out_i[r, :len(i)] = d, i
        if len(i) < k:  # pad with self at weight 0 (only with fewer valid results than asked)
            out_i[r, len(i):] = r
            out_d[r, len(d):] = 0.0
    return out_d, out_i


def knn_vote(targets: NDArray, sims: NDArray, idx: NDArray, power: float = 3.0) -> NDArray[np.float32]:
    """Weighted mean of the neighbours' label vectors: (n, C).

    Parameters
    ----------
    targets : (n, C) float, one row per graph node (truth for labeled, scores for unlabeled)
    sims, idx : (n, k) from :func:`knn_neighbours`
    """
    w = np.maximum(sims, 0.0) ** power
    num = np.einsum("nk,nkc->nc", w, np.asarray(targets, np.float32)[idx])
    den = w.sum(1, keepdims=True)
    return np.where(den > 0, num / np.maximum(den, 1e-12), np.asarray(targets, np.float32)).astype(np.float32)


def make_pseudolabels(scores: NDArray, pi: NDArray, band: float, context_of: NDArray,
                      context_scores: NDArray | None = None, pi_context: NDArray | None = None,
                      veto: bool = True) -> PseudoLabels:
    """Class-aware thresholds with a masked band, then the context veto.

    Parameters
    ----------
    scores : (N_u, C) smoothed label scores
    pi : (C,) expected label frequencies
    band : masked band half-width (relative to the expected positive count)
    context_of : (C,) context id of each label
    context_scores : (N_u, M) the context head's scores; None = no veto
    pi_context : (M,) expected context frequencies
    """
    scores = np.asarray(scores, np.float32)
    tau, decision, counted = class_aware_pseudolabels(scores, pi, band)
    vetoed = np.zeros_like(decision)
    M = int(np.max(context_of)) + 1
    if veto and context_scores is not None and M > 1:
        loose = np.minimum(np.asarray(pi_context, np.float64) * (1.0 + band), 0.99)
        _, in_context, _ = class_aware_pseudolabels(context_scores, loose, 0.0)
        vetoed = decision & ~in_context[:, context_of]
        decision = decision & ~vetoed
        counted = counted & ~vetoed
    ctx = np.zeros((len(scores), M), np.float32)
    for m in range(M):
        ctx[:, m] = decision[:, context_of == m].any(1)
    return PseudoLabels(scores=scores, decision=decision, counted=counted, vetoed=vetoed, tau=tau, contexts=ctx)
