"""HDL's linear expert: weighted multinomial logistic regression on centred, projected unit rows.

The rows are mean-centred, re-normalised and projected on their top principal axes (the "centre + L2"
trick of few-shot work on frozen features; the projection only saves time), made on demand in batches
(:class:`_LinearFeatures`) so no second N x D copy of the embeddings is held.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.utils.validation import check_is_fitted

from ssl_pipeline.labeling.knn import as_unit_float32


def _fit_softmax(X: NDArray[np.float32], y: NDArray[np.int64], w: NDArray, n_classes: int, C: float,
                 theta0: NDArray | None, max_iter: int) -> NDArray[np.float64]:
    """Weighted multinomial logistic regression ``C * sum w CE + ||W||^2 / 2``; returns [W.ravel(), b]."""
    n, d = X.shape
    rows = np.arange(n)
    y = np.asarray(y, np.int64)
    wv = np.asarray(w, np.float32) * C

    def loss_grad(theta: NDArray) -> tuple[float, NDArray]:
        # in place on one (n, C) array: scores, then probabilities, then the gradient of the scores
        W = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
        b = theta[d * n_classes:].astype(np.float32)
        S = X @ W
        S += b
        S -= S.max(axis=1, keepdims=True)
        s_own = S[rows, y].astype(np.float64)
        np.exp(S, out=S)
        Zs = S.sum(axis=1, dtype=np.float64)
        wt = theta[: d * n_classes]
        loss = -float(np.dot(wv, s_own - np.log(Zs))) + 0.5 * float(np.dot(wt, wt))
        # gradient of the scores, w * (softmax - onehot), in one scaling pass: S * (w / Zs), then -w at the labels
        S *= (wv / Zs).astype(np.float32)[:, None]
        S[rows, y] -= wv
        gW = X.T @ S
        gW += W
        return loss, np.concatenate([gW.ravel(), S.sum(axis=0)]).astype(np.float64)

    theta = np.zeros(d * n_classes + n_classes) if theta0 is None else theta0
    return _lbfgs(loss_grad, np.asarray(theta, np.float64), max_iter)


def _fit_pool(Xl: _LinearFeatures, rows: NDArray[np.int64], pos: NDArray[np.int64], w: NDArray, n_classes: int,
              C: float, theta0: NDArray | None, max_per_class: int, max_iter: int, equal_classes: bool = False,
              n_lab: int = 0, label_share: float = 0.0) -> NDArray[np.float64]:
    """:func:`_fit_softmax` on the pool ``rows`` (labels ``pos``, weights ``w``), at most ``max_per_class`` rows a
    class (the highest weights); ``equal_classes``: rescale the weights so every class has the same total.
    ``n_lab``: the pool's first rows are the given labels; each of them weighs at least enough for a class's
    given labels to hold ``label_share`` of the class's total weight (they are not drowned by its pseudo labels)."""
    if n_lab and label_share > 0:
        pseudo = np.bincount(pos[n_lab:], weights=w[n_lab:], minlength=n_classes)
        counts = np.maximum(np.bincount(pos[:n_lab], minlength=n_classes), 1)
        w = np.array(w, np.float32)
        lp = pos[:n_lab]
        w[:n_lab] = np.maximum(w[:n_lab], label_share / (1.0 - label_share) * pseudo[lp] / counts[lp])
    fit = np.flatnonzero(_rank_within_class(pos, w) < max_per_class)
    fw = w[fit]
    if equal_classes:
        cm = np.bincount(pos[fit], weights=fw, minlength=n_classes)
        fw = (fw * (cm[cm > 0].mean() / np.maximum(cm[pos[fit]], 1e-30))).astype(np.float32)
    return _fit_softmax(Xl.take(rows[fit]), pos[fit], fw, n_classes, C, theta0, max_iter)


def _lbfgs(fun, x: NDArray[np.float64], max_iter: int, m: int = 10, gtol: float = 1e-5, ftol: float = 2.2e-9
           ) -> NDArray[np.float64]:
    """Unconstrained L-BFGS (Nocedal & Wright, algorithm 7.4) with an Armijo backtracking line search.

    ``fun(x) -> (f, grad)``; ``max_iter`` iterations at most, stops early when ``max |grad| <= gtol`` or the
    relative decrease of ``f`` is below ``ftol`` (scipy's L-BFGS-B defaults). The objective here is smooth and
    strongly convex, so no bounds and no Wolfe curvature search are needed: scipy's L-BFGS-B (bound handling,
    float64 wrappers) cost as much as the loss itself on 25k parameters (caltech101, 100 classes x 256 dims).
    """
    f, g = fun(x)
    S: list[NDArray] = []
    Y: list[NDArray] = []
    for _ in range(max_iter):
        if np.abs(g).max() <= gtol:
            break
        # two-loop recursion: d = -H g
        q = g.copy()
        alphas = []
        for s_i, y_i in zip(reversed(S), reversed(Y)):
            a = float(s_i @ q) / float(y_i @ s_i)
            alphas.append(a)
            q -= a * y_i
        if S:
            q *= float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1])
        for (s_i, y_i), a in zip(zip(S, Y), reversed(alphas)):
            q += (a - float(y_i @ q) / float(y_i @ s_i)) * s_i
        d = -q
        gtd = float(g @ d)
        if gtd >= 0:  # not a descent direction (should not happen on a convex loss): steepest descent
            S.clear()
            Y.clear()
            d, gtd = -g, -float(g @ g)
        t = 1.0 if S else min(1.0, 1.0 / max(float(np.linalg.norm(g)), 1e-12))
        for _ in range(30):
            x_new = x + t * d
            f_new, g_new = fun(x_new)
            if f_new <= f + 1e-4 * t * gtd:
                break
            t *= 0.5
        else:
            break  # no decrease along d
        s_k, y_k = x_new - x, g_new - g
        sy = float(s_k @ y_k)
        if sy > 1e-10 * float(y_k @ y_k):
            S.append(s_k)
            Y.append(y_k)
            if len(S) > m:
                S.pop(0)
                Y.pop(0)
        done = (f - f_new) <= ftol * max(abs(f), abs(f_new), 1.0)
        x, f, g = x_new, f_new, g_new
        if done:
            break
    return x


def _softmax_proba(theta: NDArray, X: NDArray[np.float32] | _LinearFeatures, n_classes: int, batch: int = 65536
                   ) -> NDArray[np.float32]:
    d = X.shape[1]
    W = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
    b = theta[d * n_classes:].astype(np.float32)
    out = np.empty((len(X), n_classes), np.float32)
    if isinstance(X, _LinearFeatures):
        chunks = X.batches(batch)
    else:
        chunks = ((s, X[s:s + batch]) for s in range(0, len(X), batch))
    for s, xb in chunks:
        S = xb @ W + b
        S -= S.max(axis=1, keepdims=True)
        np.exp(S, out=S)
        S /= S.sum(axis=1, keepdims=True)
        out[s:s + len(S)] = S
    return out


def _centre(X: NDArray[np.float32], mean: NDArray[np.float32]) -> NDArray[np.float32]:
    Xc = X - mean
    Xc /= np.maximum(np.linalg.norm(Xc, axis=1, keepdims=True), 1e-12)
    return Xc


def _project(X: NDArray[np.float32], mean: NDArray[np.float32] | None, components: NDArray[np.float32] | None,
             rows: NDArray[np.int64] | None = None, batch: int = 65536) -> NDArray[np.float32]:
    """Rows of ``X`` (all, or ``rows``), centred on ``mean`` and re-normalised (if ``mean`` is given), then
    projected on ``components`` (if given); computed in batches, so only the result is allocated."""
    m = len(X) if rows is None else len(rows)
    r = X.shape[1] if components is None else components.shape[1]
    out = np.empty((m, r), np.float32)
    for s in range(0, m, batch):
        xb = X[s:s + batch] if rows is None else X[rows[s:s + batch]]
        if mean is not None:
            xb = _centre(xb, mean)
        out[s:s + batch] = xb if components is None else xb @ components
    return out


class _LinearFeatures:
    """The linear expert's rows: centred, re-normalised, projected on ``components``, made on demand.

    Stands in for the (N, r) feature matrix without materialising it, so the fit
    holds no second N x D copy of the embeddings.
    """

    def __init__(self, X: NDArray[np.float32], mean: NDArray[np.float32], components: NDArray[np.float32] | None,
                 cache_floats: int = 2 ** 25, centred: NDArray[np.float32] | None = None):
        self.X, self.mean, self.components = X, mean, components
        self.shape = (len(X), X.shape[1] if components is None else components.shape[1])
        # small pools (N x r <= cache_floats, 128 MB): the features are made once and kept (every tier reads
        # them twice), from ``centred`` (every row of X, centred and re-normalised) when given; large pools are
        # projected on demand so no second copy of the embeddings is held
        self.cache = None
        if self.shape[0] * self.shape[1] <= cache_floats:
            if centred is None:
                self.cache = _project(X, mean, components)
            else:
                self.cache = centred if components is None else np.ascontiguousarray(centred @ components)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        if self.cache is not None:
            return self.cache[np.asarray(rows)]
        return _project(self.X, self.mean, self.components, rows=np.asarray(rows))

    def batches(self, batch: int):
        for s in range(0, len(self.X), batch):
            yield s, (self.cache[s:s + batch] if self.cache is not None
                      else _project(self.X[s:s + batch], self.mean, self.components))


def _principal_axes(X: NDArray[np.float32], r: int | None, seed: int, max_rows: int = 50_000,
                    mean: NDArray[np.float32] | None = None, keep_sample: bool = False):
    """The top ``r`` principal axes (D, r) of the rows of ``X`` (a sample of them; centred on ``mean`` and
    re-normalised first when ``mean`` is given), or None if ``r >= D``.

    ``keep_sample``: return ``(axes, sample)``, the sample (M, D) being every row of ``X``, centred and
    re-normalised, when ``X`` has at most ``max_rows`` rows (else None), so a caller that needs those rows too
    does not make them twice."""
    if r is None or r >= X.shape[1]:
        return (None, None) if keep_sample else None
    rng = np.random.default_rng(seed)
    every = len(X) <= max_rows
    rows = None if every else np.sort(rng.choice(len(X), max_rows, replace=False))
    sample = _project(X, mean, None, rows=rows)
    # the (D, D) scatter about the sample mean (S^T S - M mu mu^T: the sample itself stays as it is) and its
    # eigenvectors in float32 (divide and conquer, LAPACK syevd): the axes only save time, so their last digits
    # do not matter (the top 256 of 512 span the float64 ones' subspace to 1e-7), and this is 4x faster than
    # numpy's float64 eigh
    from scipy.linalg import eigh

    mu = sample.mean(axis=0)
    scatter = sample.T @ sample
    scatter -= np.float32(len(sample)) * np.outer(mu, mu)
    _, vecs = eigh(scatter, driver="evd")
    axes = np.ascontiguousarray(vecs[:, ::-1][:, :r], dtype=np.float32)
    if keep_sample:
        return axes, (sample if every else None)
    return axes


def _rank_within_class(cls: NDArray[np.int64], score: NDArray) -> NDArray[np.int64]:
    """Rank (0 = best) of every entry among the entries of its class, by descending score."""
    order = np.lexsort((-score, cls))
    sorted_cls = cls[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cls)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(cls), np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


class _LinearExpertPredict:
    """Inductive use of a fitted labeler's final linear expert (``coef_``, ``intercept_``, ``center_``,
    ``components_``, ``classes_``): a mixin of :class:`ssl_pipeline.labeling.hdl.HDL`."""

    def predict_proba(self, X: NDArray) -> NDArray[np.float32]:
        """Class probabilities (M, C) for new points ``X`` (M, D) from the final linear expert."""
        check_is_fitted(self, "coef_")
        Xc = _centre(as_unit_float32(X), self.center_)
        if self.components_ is not None:
            Xc = np.ascontiguousarray(Xc @ self.components_)
        theta = np.concatenate([self.coef_.ravel(), self.intercept_]).astype(np.float64)
        return _softmax_proba(theta, Xc, len(self.classes_))
