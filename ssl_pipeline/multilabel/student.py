"""The multi-label retrain's student: a pooled-feature linear model on labeled + pseudo-labeled images, mixed with
the alignment head and smoothed over the training images' embeddings; its settings chosen on held-out folds.

One candidate is ``(lam, w, alpha)``:

1. **Linear member**: one-vs-rest logistic regression on the L2-normalised pooled embeddings, fitted on the
   labeled images (their labels, weight 1) and the unlabeled ones (the pseudolabel stage's smoothed soft scores as
   targets, weight ``lam``; ``lam = 0``: labeled images only). Objective per class, as scikit-learn's
   ``LogisticRegression(C)``: ``C * sum_i weight_i * BCE(target_i, x_i . w + b) + |w|^2 / 2``.
2. **Mix**: ``S0 = w * head + (1 - w) * linear`` (probabilities; ``head``: the semi-supervised alignment head).
3. **Neighbour smoothing**: ``S = (1 - alpha) * S0 + alpha * vote``, the vote being the mean of the reference
   scores of the image's ``k`` nearest training images (pooled cosine, weights ``max(cos, 0) ** power``); the
   reference scores are the labels on labeled images and ``S0`` on unlabeled ones.

:func:`choose` scores every candidate of :func:`candidates` on the held-out folds of labeled images (each fold's
refit labeler: its head, its pseudo-labels; the fold's images hidden from the linear fit and the references) and
keeps the best macro mAP; the labeled-only logistic regression ``(0, 0, 0)`` and the head alone ``(., 1, 0)`` are
candidates, so the choice never trails either on validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from ssl_pipeline.multilabel.settings import macro_map


@dataclass(frozen=True)
class Candidate:
    """``lam``: weight of the pseudo-labeled images in the linear fit; ``w``: weight of the alignment head in the
    mix; ``alpha``: weight of the neighbour vote."""

    lam: float
    w: float
    alpha: float

    @property
    def name(self) -> str:
        return f"lam{self.lam:g}_w{self.w:g}_a{self.alpha:g}"


def candidates(st: dict) -> list[Candidate]:
    """The grid of ``multilabel.student``: lambdas x head_weights x knn_alphas (``lam`` only where ``w < 1``)."""
    out = []
    for w in st["head_weights"]:
        for lam in (st["lambdas"] if float(w) < 1.0 else [0.0]):
            for a in st["knn_alphas"]:
                out.append(Candidate(float(lam), float(w), float(a)))
    return out


def fit_linear(X: NDArray, T: NDArray, weight: NDArray, C: float, max_iter: int = 300
               ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """One-vs-rest L2 logistic regression with soft targets: X (n, D), T (n, K) in [0, 1], weight (n,) ->
    (W (D, K), b (K,)) float32. Full-batch L-BFGS in float64 (deterministic)."""
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float64)
    Tt = torch.as_tensor(np.asarray(T), dtype=torch.float64)
    wt = torch.as_tensor(np.asarray(weight), dtype=torch.float64)[:, None]
    n, K = Tt.shape
    W = torch.zeros(Xt.shape[1], K, dtype=torch.float64, requires_grad=True)
    p = ((wt * Tt).sum(0) / wt.sum().clamp_min(1e-12)).clamp(1e-4, 1 - 1e-4)
    b = torch.log(p / (1 - p)).detach().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def closure():
        opt.zero_grad()
        z = Xt @ W + b
        loss = (float(C) * (wt * bce(z, Tt, reduction="none")).sum() + 0.5 * (W * W).sum()) / n
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy().astype(np.float32), b.detach().numpy().astype(np.float32)


def linear_scores(X: NDArray, W: NDArray, b: NDArray) -> NDArray[np.float32]:
    """Sigmoid scores (n, K) of the linear member on X (n, D)."""
    z = np.asarray(X, np.float32) @ W + b
    return (1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))).astype(np.float32)


def neighbours(X_query: NDArray, X_ref: NDArray, k: int, self_pos: NDArray | None = None
               ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The ``k`` nearest reference rows of each query (inner product of L2-normalised rows): (sims (m, k),
    idx (m, k)) into ``X_ref``. ``self_pos`` (m,): each query's own position in ``X_ref`` (-1: none), dropped."""
    from ssl_pipeline.labeling.knn import exact_search

    kk = int(min(k + 1, len(X_ref)))
    sims, idx = exact_search(np.asarray(X_ref, np.float32), np.asarray(X_query, np.float32), kk)
    if self_pos is None:
        self_pos = np.full(len(X_query), -1)
    is_self = idx == np.asarray(self_pos)[:, None]
    keep = ~is_self
    keep[~is_self.any(1), -1] = False
    return sims[keep].reshape(len(idx), kk - 1), idx[keep].reshape(len(idx), kk - 1)


def smooth(S0: NDArray, sims: NDArray, idx: NDArray, R: NDArray, alpha: float, power: float) -> NDArray:
    """``(1 - alpha) * S0 + alpha * vote``: S0 (m, K), neighbours (sims, idx) (m, k) into R (n_ref, K)."""
    if alpha <= 0:
        return np.asarray(S0, np.float32)
    S0 = np.asarray(S0, np.float32)
    w = np.where(idx >= 0, np.maximum(sims, 0.0), 0.0) ** power
    num = np.einsum("mk,mkc->mc", w, np.asarray(R, np.float32)[np.maximum(idx, 0)])
    den = w.sum(1, keepdims=True)
    vote = np.where(den > 0, num / np.maximum(den, 1e-12), S0)
    return ((1.0 - alpha) * S0 + alpha * vote).astype(np.float32)


@dataclass
class Student:
    """A fitted student: the linear member (W (D, K), b (K,)), the mix and smoothing of its candidate, and the
    references (embeddings (n_ref, D), scores (n_ref, K)) the neighbour vote reads."""

    cand: Candidate
    W: NDArray
    b: NDArray
    ref_X: NDArray
    ref_S: NDArray
    k: int
    power: float

    def scores(self, X: NDArray, head_scores: NDArray, self_pos: NDArray | None = None) -> NDArray[np.float32]:
        """Final scores (m, K) of images with pooled embeddings X (m, D) and alignment-head scores (m, K)."""
        c = self.cand
        S0 = c.w * np.asarray(head_scores, np.float32) + (1.0 - c.w) * linear_scores(X, self.W, self.b)
        if c.alpha <= 0:
            return S0.astype(np.float32)
        sims, idx = neighbours(X, self.ref_X, self.k, self_pos)
        return smooth(S0, sims, idx, self.ref_S, c.alpha, self.power)


def fit_student(cand: Candidate, X: NDArray, Y: NDArray, labeled: NDArray[np.bool_], targets: NDArray,
                head_scores: NDArray, st: dict, fits: dict | None = None) -> Student:
    """Fit candidate ``cand`` on the n training rows: pooled X (n, D), labels Y (n, K) (read on ``labeled``),
    pseudo-label soft ``targets`` (n, K) (read on the other rows), alignment-head scores (n, K).

    ``fits``: a cache {lam: (W, b)} shared between candidates of the same rows."""
    lab = np.asarray(labeled, bool)
    fits = {} if fits is None else fits
    if cand.lam not in fits:
        use = lab | (cand.lam > 0)
        T = np.where(lab[:, None], Y, targets)[use]
        wt = np.where(lab, 1.0, cand.lam)[use]
        fits[cand.lam] = fit_linear(X[use], T, wt, float(st["C"]))
    W, b = fits[cand.lam]
    S0 = cand.w * np.asarray(head_scores, np.float32) + (1.0 - cand.w) * linear_scores(X, W, b)
    ref_S = np.where(lab[:, None], Y, S0).astype(np.float32)
    return Student(cand, W, b, np.asarray(X, np.float32), ref_S, int(st["knn_k"]), float(st["knn_power"]))


def choose(X: NDArray, Y: NDArray, labeled: NDArray[np.bool_], folds: list[tuple[NDArray, NDArray, NDArray]],
           st: dict) -> tuple[Candidate, dict[str, float]]:
    """The candidate with the best macro mAP over the held-out folds, and every candidate's ``val`` mAP.

    Parameters
    ----------
    X : (n, D) pooled embeddings of the training rows; Y : (n, K) labels (read on ``labeled`` rows)
    folds : per fold (held (h,) positions of hidden labeled rows, head (n, K) the fold labeler's head scores,
        targets (n, K) its pseudo-label scores); each fold's fit sees ``labeled`` minus ``held`` as labeled, the
        other rows but ``held`` as unlabeled.

    Ties go to the earlier candidate of :func:`candidates`.
    """
    cands = candidates(st)
    held_all = np.concatenate([f[0] for f in folds])
    pred = {c: [] for c in cands}
    for held, head, targets in folds:
        keep = np.ones(len(X), bool)
        keep[held] = False
        lab_f = np.asarray(labeled, bool) & keep
        fits: dict = {}
        for c in cands:
            s = fit_student(c, X[keep], Y[keep], lab_f[keep], targets[keep], head[keep], st, fits)
            pred[c].append(s.scores(X[held], head[held]))
    vals = {c.name: macro_map(Y[held_all], np.concatenate(pred[c])) for c in cands}
    best = max(cands, key=lambda c: (vals[c.name], -cands.index(c)))
    return best, vals
