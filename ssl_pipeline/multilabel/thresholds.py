"""Class-aware pseudo-label thresholds (CAP) with a masked band of uncertain scores.

For class k with (smoothed) positive frequency pi_k, estimated on labeled
data, and N_u unlabeled scores s_{., k}:

* ``n_k = round(pi_k * N_u)`` images are called positive: those with the n_k
  largest scores (tau_k = the n_k-th largest score);
* the band of ranks ``[(1 - band) * n_k, (1 + band) * n_k)`` around that cut is
  masked out of the loss: only confident positives (rank < (1 - band) n_k) and
  confident negatives (rank >= (1 + band) n_k) train the model.

Ties at the cut are broken by row order (a stable sort), so the count of
positives is exactly n_k.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def class_frequencies(Y: NDArray, prior_strength: float = 2.0, low: float | None = None,
                      high: float = 0.95) -> NDArray[np.float64]:
    """Smoothed, clipped positive frequency of each class from labeled rows.

    ``pi_k = (n_k + a * mean_pi) / (n + a)`` shrinks each frequency towards the
    mean label frequency with ``a = prior_strength`` pseudo-images (rare classes
    seen 0-2 times in a 5% labeled set are not set to ~0), then clips to
    ``[low, high]`` (``low`` default ``1 / (n + 1)``).

    Parameters
    ----------
    Y : (n, C) 0/1, labeled rows
    """
    Y = np.asarray(Y, np.float64)
    n = len(Y)
    if n == 0:
        raise ValueError("class frequencies need at least one labeled row")
    raw = Y.mean(0)
    pi = (Y.sum(0) + prior_strength * raw.mean()) / (n + prior_strength)
    return np.clip(pi, 1.0 / (n + 1) if low is None else low, high)


def class_aware_pseudolabels(scores: NDArray, pi: NDArray, band: float = 0.25
                             ) -> tuple[NDArray[np.float64], NDArray[np.bool_], NDArray[np.bool_]]:
    """Per-class quantile thresholds; return (tau (C,), decision (N_u, C) bool, counted (N_u, C) bool).

    Parameters
    ----------
    scores : (N_u, C) float
        Scores of the unlabeled images (any monotone scale: probabilities, logits).
    pi : (C,) float in (0, 1)
        Expected positive frequency of each class.
    band : float in [0, 1)
        Half-width of the masked band, relative to the expected positive count.

    Returns
    -------
    tau : (C,) the score of the last image called positive (+inf when none)
    decision : (N_u, C) True = pseudo-positive
    counted : (N_u, C) True = the entry trains the model (outside the uncertain band)
    """
    scores = np.asarray(scores, np.float64)
    N, C = scores.shape
    if not 0.0 <= band < 1.0:
        raise ValueError(f"band must be in [0, 1), got {band}")
    pi = np.asarray(pi, np.float64)
    decision = np.zeros((N, C), bool)
    counted = np.ones((N, C), bool)
    tau = np.full(C, np.inf)
    for k in range(C):
        order = np.argsort(-scores[:, k], kind="stable")
        rank = np.empty(N, np.int64)
        rank[order] = np.arange(N)
        n_pos = int(round(pi[k] * N))
        decision[:, k] = rank < n_pos
        if n_pos > 0:
            tau[k] = scores[order[n_pos - 1], k]
        lo = int(np.floor((1.0 - band) * n_pos))
        hi = int(np.ceil((1.0 + band) * n_pos))
        counted[:, k] = (rank < lo) | (rank >= hi)
    return tau, decision, counted
