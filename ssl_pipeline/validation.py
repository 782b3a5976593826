"""Held-out folds of the labeled rows: the honest objective of a sweep (``val/accuracy``, ``val/map``).

The main run always uses every label. The validation figures come from extra
fits of the labeler (and of the retrained model) in which one fold of the
labeled rows is hidden, scored on that fold:

* few labeled rows (fewer than ``val.kfold_below``): stratified k-fold
  (``val.folds`` folds); every held-out row is scored once, by the fit that hid it;
* many: one stratified split holding out ``val.fraction`` of each class's labels
  (one extra fit, so the cost stays bounded at scale).

Above ``val.max_rows`` graph rows the validation fit runs on a seeded uniform
sample of that many rows with its own exact kNN graph and one held-out split
(single-label labelers), which bounds its cost at scale; the sparser graph makes
that figure lower than the full run's accuracy (a ranking, not an estimate).
The default, 20k rows, keeps that extra fit near a tenth of the cost of a 200k-row run
(at 50k it was about a quarter of it, graph included).

A class with a single labeled row is never held out (hiding it would leave the
labeler without the class); neither is a row whose removal would leave a label of
multi-label data without a training positive. Folds are seeded (``val.seed``).
Settings come from ``cfg.val`` (conf/config.yaml); ``val.folds=0`` turns validation off. The k-fold fits
of a single-label labeler run concurrently in ``val.n_jobs`` threads (-1: one per core), each with one
BLAS thread; the figures do not depend on it.
"""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig

from ssl_pipeline.errors import ConfigError

DEFAULTS = {"folds": 5, "kfold_below": 500, "fraction": 0.2, "multilabel_folds": 1, "retrain_folds": 1,
            "max_rows": 20_000, "seed": 0, "n_jobs": -1}
RESULT_FREE = ("n_jobs",)  # settings that change how fast the folds run, not what they give (not in cache keys)


def settings(cfg: DictConfig) -> dict:
    """``cfg.val`` over :data:`DEFAULTS`, validated (ConfigError names the key)."""
    v = dict(DEFAULTS, seed=int(cfg.get("seed", 0)))
    given = cfg.get("val") or {}
    for k in given:
        if k not in DEFAULTS:
            raise ConfigError(f"val.{k}", f"unknown validation setting; valid: {', '.join(sorted(DEFAULTS))}")
        v[k] = given[k]
    for k in ("folds", "kfold_below", "multilabel_folds", "retrain_folds", "max_rows"):
        if int(v[k]) < 0:
            raise ConfigError(f"val.{k}", f"must be >= 0, got {v[k]}")
    if int(v["n_jobs"]) == 0 or int(v["n_jobs"]) < -1:
        raise ConfigError("val.n_jobs", f"must be -1 (one per core) or >= 1, got {v['n_jobs']}")
    if int(v["folds"]) == 1:
        raise ConfigError("val.folds", "must be 0 (off) or >= 2")
    if not 0.0 < float(v["fraction"]) < 1.0:
        raise ConfigError("val.fraction", f"must be in (0, 1), got {v['fraction']}")
    return v


def n_workers(s: dict, n_tasks: int) -> int:
    """Threads for ``n_tasks`` fold fits under ``s['n_jobs']`` (-1: the cores this process may use)."""
    import os

    jobs = int(s["n_jobs"])
    if jobs == -1:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(jobs, n_tasks))


def single_label_folds(y: np.ndarray, s: dict) -> list[np.ndarray]:
    """Held-out folds of the labeled entries of ``y`` (N,) (-1 = unlabeled): a list of index arrays into ``y``.

    k-fold (``s['folds']``) when there are fewer than ``s['kfold_below']`` labeled
    rows, else one split holding out ``s['fraction']`` of each class. Classes with one
    labeled row are never held out.
    """
    k = int(s["folds"])
    lab = np.flatnonzero(y >= 0)
    if k == 0 or len(lab) == 0:
        return []
    rng = np.random.default_rng(int(s["seed"]))
    kfold = len(lab) < int(s["kfold_below"])
    n_folds = k if kfold else 1
    folds: list[list[int]] = [[] for _ in range(n_folds)]
    start = 0
    for c in np.unique(y[lab]):
        rows = rng.permutation(lab[y[lab] == c])
        if len(rows) < 2:
            continue
        if kfold:  # row j of the class goes to fold (start + j) mod k: <= ceil(n_c / k) <= n_c - 1 held out per fold
            for j, r in enumerate(rows):
                folds[(start + j) % n_folds].append(int(r))
            start += len(rows)
        else:
            n_out = min(len(rows) - 1, max(1, int(round(float(s["fraction"]) * len(rows)))))
            folds[0].extend(int(r) for r in rows[:n_out])
    return [np.sort(np.asarray(f, np.int64)) for f in folds if f]


def multilabel_folds(Y: np.ndarray, labeled: np.ndarray, s: dict) -> list[np.ndarray]:
    """Held-out folds of the labeled rows of a multi-label ``Y`` (N, C): index arrays into the rows.

    ``s['multilabel_folds']`` seeded splits, each holding out ``s['fraction']`` of
    the labeled rows (disjoint across splits), skipping any row whose removal would
    leave a label without a labeled positive in the fit.
    """
    n = int(s["multilabel_folds"]) if int(s["folds"]) else 0
    lab = np.flatnonzero(labeled)
    if n == 0 or len(lab) < 2:
        return []
    rng = np.random.default_rng(int(s["seed"]))
    order = rng.permutation(lab)
    size = max(1, int(round(float(s["fraction"]) * len(lab))))
    folds, used = [], 0
    for _ in range(n):
        pos_left = Y[lab].sum(0).astype(np.int64)
        fold = []
        while used < len(order) and len(fold) < size:
            r = order[used]
            used += 1
            if (pos_left - Y[r] >= 1)[Y[r] == 1].all():
                fold.append(int(r))
                pos_left -= Y[r].astype(np.int64)
        if fold:
            folds.append(np.sort(np.asarray(fold, np.int64)))
    return folds
