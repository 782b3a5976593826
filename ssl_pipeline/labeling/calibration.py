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
