"""The multi-label branch of ``data=embeddings``: precomputed embeddings with a 0/1 label matrix.

File format (``.npz``)::

    X        (N, D) float    image embeddings (L2-normalised by the encode stage)
    Y        (N, C) 0/1      labels (int, bool or float 0./1.); scoring uses them on every row
    labeled  (N,) bool       rows whose labels the labeler and the retrain may see (train rows only)
    split    (N,) str        optional, train / test (default: every row is train)
    classes  (C,) str        optional label names (default "0".."C-1")
    text     (C, D) float    optional class-name embeddings of the same model, one row per label
    ids      (N,) str        optional unique row ids

Every label needs at least one labeled positive (its classifier and its pseudo-label
threshold are learned from them). No images are read: the multi-label path runs on
the pooled embeddings (one "token" per row, see :mod:`ssl_pipeline.multilabel.recipe`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import DataError


def _bool_array(p: Path, name: str, a: np.ndarray, shape: tuple) -> np.ndarray:
    if a.shape != shape:
        raise DataError(f"{p}: {name} must have shape {shape} to match X, got {a.shape}")
    if a.dtype == bool:
        return a
    if not np.issubdtype(a.dtype, np.number):
        raise DataError(f"{p}: {name} must hold 0/1 values, got dtype {a.dtype}")
    bad = ~np.isin(a, (0, 1))
    if bad.any():
        r = int(np.argwhere(bad)[0][0])
        raise DataError(f"{p}: {name} must hold only 0/1 values; row {r} holds {a[r].tolist() if a.ndim > 1 else a[r]}")
    return a.astype(bool)


def check_multilabel_arrays(p: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate a multi-label embeddings file's arrays (see the module docstring); return them normalised.

    ``Y`` becomes (N, C) int8, ``labeled`` (N,) bool. Raises DataError naming the file and the bad array.
    """
    from ssl_pipeline.data.sources import check_X

    for k in ("X", "Y", "labeled"):
        if k not in arrays:
            raise DataError(f"{p}: missing array {k!r} (a multi-label file has X, Y, labeled; has: {sorted(arrays)})")
    if "y" in arrays:
        raise DataError(f"{p}: holds both y (single-label) and Y (multi-label); keep one")
    X = arrays["X"]
    check_X(p, X)
    n = X.shape[0]
    Y = arrays["Y"]
    if Y.ndim != 2 or Y.shape[0] != n or Y.shape[1] == 0:
        raise DataError(f"{p}: Y must be an N x C array with N = {n} rows (as X), got shape {Y.shape}")
    Y = _bool_array(p, "Y", Y, Y.shape).astype(np.int8)
    C = Y.shape[1]
    labeled = _bool_array(p, "labeled", arrays["labeled"], (n,))
    for k in ("split", "ids"):
        if k in arrays and arrays[k].shape != (n,):
            raise DataError(f"{p}: {k} must have shape ({n},) to match X, got {arrays[k].shape}")
    split = arrays["split"].astype(str) if "split" in arrays else np.full(n, "train")
    bad = set(np.unique(split).tolist()) - {"train", "test"}
    if bad:
        raise DataError(f"{p}: split holds values {sorted(bad)}; allowed: train, test")
    if (labeled & (split == "test")).any():
        raise DataError(f"{p}: labeled marks {int((labeled & (split == 'test')).sum())} test rows; "
                        "only train rows can be labeled")
    if not labeled.any():
        raise DataError(f"{p}: labeled has no True row")
    if "classes" in arrays and arrays["classes"].shape != (C,):
        raise DataError(f"{p}: classes must have {C} names (one per column of Y), got shape {arrays['classes'].shape}")
    names = [str(c) for c in arrays["classes"]] if "classes" in arrays else [str(c) for c in range(C)]
    no_pos = [names[c] for c in np.flatnonzero(Y[labeled].sum(0) == 0)]
    if no_pos:
        raise DataError(f"{p}: labels {no_pos[:5]}{' ...' if len(no_pos) > 5 else ''} ({len(no_pos)} in all) have "
                        "no labeled positive row (Y == 1 where labeled); every label needs one")
    if "text" in arrays:
        T = arrays["text"]
        if T.shape != (C, X.shape[1]) or not np.issubdtype(T.dtype, np.number):
            raise DataError(f"{p}: text must be a numeric C x D = {C} x {X.shape[1]} array (one row per label), "
                            f"got shape {T.shape}")
        if not np.isfinite(T).all() or not T.any(axis=1).all():
            raise DataError(f"{p}: text holds NaN, inf or all-zero rows")
    out = dict(arrays)
    out.update(Y=Y, labeled=labeled, split=split)
    return out


def multilabel_embeddings_table(cfg: DictConfig, a: dict[str, np.ndarray]) -> SampleTable:
    """A multi-label table over a checked embeddings file (``a`` from :func:`check_multilabel_arrays`)."""
    n, C = a["Y"].shape
    classes = [str(c) for c in a["classes"]] if "classes" in a else [str(c) for c in range(C)]
    ids = [str(i) for i in a["ids"]] if "ids" in a else [f"row{i:07d}" for i in range(n)]
    meta = {"path": str(Path(cfg.path).expanduser().resolve()), "embeddings_only": True,
            "labeled_fraction": float(a["labeled"].mean())}
    if "text" in a:
        meta["text"] = a["text"].astype(np.float32)
    return SampleTable(ids=ids, paths=[None] * n, split=a["split"], y_true=a["Y"], labeled=a["labeled"],
                       classes=classes, multilabel=True, meta=meta)
