"""Shared fixtures: tiny generated images, tiny embedding files, composed configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared" / "data"


def make_config(*overrides: str, cache_dir: Path | None = None):
    """Compose the real root config with ``overrides`` (no Hydra run directory needed)."""
    ov = list(overrides)
    if cache_dir is not None:
        ov.append(f"paths.cache_dir={cache_dir}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=ov, return_hydra_config=False)


def tiny_overrides(root: Path, **extra) -> list[str]:
    """Overrides that shrink a run to seconds: tiny CLIP, few retrain steps."""
    ov = {"backbone": "tiny", "data": "image_folder", "data.root": str(root / "train"),
          "data.test_root": str(root / "test"), "data.labeled_per_class": 2, "retrain.steps": 30,
          "cluster.n_clusters": 3, "encode.shard_size": 16, "encode.batch_size": 8}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def _blob_image(rng: np.random.Generator, cls: int, size: int = 24) -> Image.Image:
    """A small image whose dominant colour depends on the class (so classes are separable)."""
    base = np.zeros((size, size, 3), np.float32)
    base[..., cls % 3] = 200
    base += rng.normal(0, 25, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, n_train: int = 10, n_test: int = 4, classes=("red", "green", "blue"),
                      seed: int = 0) -> Path:
    """root/train/<class>/*.png and root/test/<class>/*.png with class-coloured noise images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _blob_image(rng, c).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


def blobs(n_per_class: int = 60, n_classes: int = 4, dim: int = 16, noise: float = 0.15, seed: int = 0):
    """Well-separated unit-norm Gaussian blobs: X (N, dim) float32, y (N,) int64."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centers[y] + noise * rng.standard_normal((len(y), dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y.astype(np.int64)


@pytest.fixture
def embeddings_file(tmp_path: Path) -> Path:
    X, y = blobs()
    rng = np.random.default_rng(1)
    lab = np.zeros(len(y), bool)
    for c in np.unique(y):
        lab[rng.choice(np.flatnonzero(y == c), 3, replace=False)] = True
    split = np.where(rng.random(len(y)) < 0.2, "test", "train")
    lab &= split == "train"
    p = tmp_path / "emb.npz"
    np.savez(p, X=X, y=np.where(lab, y, -1), y_true=y, split=split)
    return p
