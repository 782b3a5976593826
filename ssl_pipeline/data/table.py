"""The sample table every data source produces, and the seeded labeled/test splits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.errors import ConfigError, DataError


@dataclass
class SampleTable:
    """All samples of a run, train and test, in a fixed order.

    Attributes
    ----------
    ids : list[str], length N
        Unique sample ids (paths relative to the data root for image files).
    paths : list[str | None], length N
        Absolute image paths, or None for in-memory images / precomputed embeddings.
    split : (N,) str
        ``"train"`` or ``"test"``; only train rows are pseudo-labeled.
    y_true : (N,) int or (N, C) int8
        Ground truth where known (-1 = unknown); (N, C) 0/1 for multi-label data.
    labeled : (N,) bool
        Rows whose label the labelers may see (always train rows).
    classes : list[str], length C
        Class names, index = class id.
    load_image : callable(i) -> PIL.Image, optional
        For in-memory sources, returns image i.
    multilabel : bool
    """

    ids: list[str]
    paths: list[str | None]
    split: NDArray
    y_true: NDArray
    labeled: NDArray[np.bool_]
    classes: list[str]
    load_image: Callable | None = None
    multilabel: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if len(set(self.ids)) != n:
            dup = next(i for i in self.ids if self.ids.count(i) > 1)
            raise DataError(f"sample ids must be unique; {dup!r} appears more than once")
        for name in ("paths", "split", "y_true", "labeled"):
            if len(getattr(self, name)) != n:
                raise DataError(f"sample table column {name!r} has {len(getattr(self, name))} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def train(self) -> NDArray[np.bool_]:
        return self.split == "train"

    @property
    def test(self) -> NDArray[np.bool_]:
        return self.split == "test"

    @property
    def y(self) -> NDArray[np.int64]:
        """Labels the labelers see: (N,) truth on labeled rows, -1 elsewhere (single-label only)."""
        if self.multilabel:
            raise TypeError("y is single-label; use y_true and labeled for multi-label tables")
        return np.where(self.labeled, self.y_true, -1).astype(np.int64)

    def subset(self, rows: NDArray) -> SampleTable:
        """The table restricted to ``rows`` (bool mask or int indices), order kept."""
        rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        loader = self.load_image
        sub_loader = None if loader is None else (lambda i, _r=rows, _f=loader: _f(int(_r[i])))
        return SampleTable(
            ids=[self.ids[i] for i in rows], paths=[self.paths[i] for i in rows], split=self.split[rows],
            y_true=self.y_true[rows], labeled=self.labeled[rows], classes=self.classes, load_image=sub_loader,
            multilabel=self.multilabel, meta=self.meta,
        )


def stratified_test_split(y: NDArray, fraction: float, seed: int) -> NDArray[np.bool_]:
    """A seeded test mask taking ``fraction`` of each class (rounded, at least 1 where fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError("data.test_fraction", f"must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed + 7919)
    test = np.zeros(len(y), bool)
    if fraction == 0:
        return test
    for c in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == c)
        n = max(1, int(round(fraction * len(idx))))
        test[rng.choice(idx, min(n, len(idx) - 1), replace=False)] = True
    return test


def labeled_per_class_mask(y: NDArray, eligible: NDArray[np.bool_], n: int, seed: int,
                           key: str = "data.labeled_per_class") -> NDArray[np.bool_]:
    """The benchmark protocol's labeled mask: ``n`` rows per class among ``eligible`` rows.

    Uses ``np.random.default_rng(seed)`` and, per class in ascending order,
    ``rng.choice(rows_of_class, n, replace=False)``, exactly as BENCHMARKS.md.
    Raises ConfigError naming ``key`` when a class has fewer than ``n`` rows.
    """
    if int(n) != n or n < 1:
        raise ConfigError(key, f"must be a positive integer, got {n!r}")
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(y), bool)
    for c in np.unique(y[eligible & (y >= 0)]):
        idx = np.flatnonzero(eligible & (y == c))
        if len(idx) < n:
            raise ConfigError(key, f"asks for {n} labeled images per class but class {c} has only {len(idx)} "
                                   f"training images; lower {key}")
        mask[rng.choice(idx, int(n), replace=False)] = True
    return mask
