"""Calibration of a labeler's confidence: expected calibration error (Guo et al. 2017, 15 bins)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def expected_calibration_error(confidence: NDArray, correct: NDArray, n_bins: int = 15) -> float:
    """ECE = sum over equal-width confidence bins of (share of rows) * |accuracy - mean confidence|.

    ``confidence`` (N,) in [0, 1], ``correct`` (N,) bool; 0.0 for no rows. A labeler whose confidence 0.9
    is right 90% of the time scores near 0.
    """
    conf = np.clip(np.asarray(confidence, np.float64).ravel(), 0.0, 1.0)
    ok = np.asarray(correct, bool).ravel()
    if conf.shape != ok.shape:
        raise ValueError(f"confidence has {conf.size} rows, correct has {ok.size}")
    if conf.size == 0:
        return 0.0
    b = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, ok, n_bins) - np.bincount(b, conf, n_bins))
    return float(gap.sum() / conf.size) if count.any() else 0.0


def match_temperature(P: NDArray, target: float, rows: NDArray | None = None, max_rows: int = 4096,
                      seed: int = 0) -> float:
    """Exponent ``1 / T`` that makes the mean top-class probability of ``P ** (1/T)`` (rows renormalised)
    equal ``target``: a temperature chosen from an accuracy estimate, e.g. a leave-one-out accuracy on the
    labeled rows. ``P`` (N, C) posteriors; ``rows`` (optional) the rows to match on, at most ``max_rows`` of
    them (a seeded sample). Returns the exponent in [1/20, 20]; a monotone map per row, so the argmax and the
    within-row ranking are unchanged (only the confidence scale moves).
    """
    rows = np.arange(len(P)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        return 1.0
    if len(rows) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    L = np.log(np.maximum(np.asarray(P[rows], np.float32), 1e-30))
    L -= L.max(axis=1, keepdims=True)  # top class at 0: its probability is 1 / sum exp(e * L)

    def mean_conf(e: float) -> float:
        return float(np.mean(1.0 / np.exp(e * L).sum(axis=1)))

    lo, hi = np.log(1 / 20), np.log(20.0)  # mean_conf grows with the exponent: bisection on log(exponent)
    target = float(np.clip(target, mean_conf(np.exp(lo)), mean_conf(np.exp(hi))))
    for _ in range(16):  # exponent to within 0.01% (log range 6.0 / 2 ** 16)
        mid = 0.5 * (lo + hi)
        if mean_conf(np.exp(mid)) < target:
            lo = mid
        else:
            hi = mid
    return float(np.exp(0.5 * (lo + hi)))


def power_rows(P: NDArray, exponent: float, batch: int = 65536) -> NDArray:
    """``P ** exponent`` with rows renormalised, in place (float arrays), in batches of rows."""
    if exponent == 1.0:
        return P
    for s in range(0, len(P), batch):
        b = P[s:s + batch]
        np.maximum(b, 1e-30, out=b)
        np.log(b, out=b)
        b *= exponent
        b -= b.max(axis=1, keepdims=True)
        np.exp(b, out=b)
        b /= b.sum(axis=1, keepdims=True)
    return P
