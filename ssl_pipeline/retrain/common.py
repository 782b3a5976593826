"""Training sets of the retrain stage: which rows, labels, weights and targets a model learns from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError

# retrain keys that change how a run is executed or observed, not its result (left out of the cache key)
RUNTIME_KEYS = ("resume", "logger", "callbacks", "num_workers", "checkpoint_every", "val_every", "log_every",
                "eval_batch_size", "preload_max", "num_threads")


def select_training(rows, labels, conf, labeled, noise, rcfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, weights, is_pseudo) of the samples the semi-supervised model trains on."""
    conf = np.asarray(conf, np.float32)
    keep = labeled | ((labels >= 0) & (conf >= float(rcfg.min_confidence)))
    if rcfg.get("drop_noisy", True):
        keep &= labeled | ~noise
    if rcfg.get("pseudo_weight", "confidence") == "one":
        w = np.ones(len(rows), np.float32)
    else:
        w = np.where(labeled, 1.0, conf).astype(np.float32)
    return rows[keep], labels[keep], w[keep], ~labeled[keep]


def training_set(pl_dir: Path, rcfg: DictConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, weights, is_pseudo) from a pseudolabel artifact."""
    return select_training(np.load(pl_dir / "rows.npy"), np.load(pl_dir / "labels.npy"),
                           np.load(pl_dir / "confidence.npy"), np.load(pl_dir / "labeled.npy"),
                           np.load(pl_dir / "noise.npy"), rcfg)


def filter_pseudo(labels: np.ndarray, conf: np.ndarray, labeled: np.ndarray, teacher_logits: np.ndarray | None,
                  how: str = "none", top: float = 1.0) -> np.ndarray:
    """Pseudo-labels kept for training (-1 = dropped) on the training rows; given labels are kept as they are.

    ``how="agree"``: keep those the teacher (the previous model) predicts too. ``top < 1``: then keep, per
    class, the ``top`` share ranked by labeler confidence times the teacher's probability of the label.
    """
    use = np.asarray(labels, np.int64).copy()
    unl = ~labeled & (use >= 0)
    score = np.asarray(conf, np.float64).copy()
    if teacher_logits is not None and len(teacher_logits):
        z = teacher_logits - teacher_logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        if how == "agree":
            use[unl & (p.argmax(1) != use)] = -1
        score = score * p[np.arange(len(use)), np.clip(use, 0, p.shape[1] - 1)]
    if not 0 < top <= 1:
        raise ConfigError("retrain.pseudo_top", f"must be in (0, 1], got {top}")
    if top < 1:
        for c in np.unique(use[~labeled & (use >= 0)]):
            idx = np.flatnonzero(~labeled & (use == c))
            keep = max(1, int(round(top * len(idx))))
            use[idx[np.argsort(-score[idx], kind="stable")[keep:]]] = -1
    return use


def soft_targets(labels: np.ndarray, conf: np.ndarray, labeled: np.ndarray, teacher_probs: np.ndarray) -> np.ndarray:
    """(n, C) training targets: one-hot on given labels; on pseudo-labeled rows the product of the labeler's
    label as a distribution (``conf`` on it, the rest spread evenly; uniform where dropped) and the teacher's
    posterior, renormalised."""
    n, C = teacher_probs.shape
    conf = np.clip(np.asarray(conf, np.float64), 1e-3, 1 - 1e-3)
    r = np.tile(((1 - conf) / max(1, C - 1))[:, None], (1, C))
    has = labels >= 0
    r[has, labels[has]] = conf[has]
    r[~has] = 1.0 / C
    q = r * np.asarray(teacher_probs, np.float64)
    q /= q.sum(1, keepdims=True).clip(1e-12)
    q[labeled] = 0
    q[labeled, labels[labeled]] = 1
    return q.astype(np.float32)


def key_config(cfg: DictConfig) -> dict:
    rc = OmegaConf.to_container(cfg.retrain, resolve=True)
    for k in RUNTIME_KEYS:
        rc.pop(k, None)
    conf = {"retrain": rc, "loss": OmegaConf.to_container(cfg.loss), "seed": int(cfg.seed)}
    if rc.get("mode", "head") == "finetune":
        conf["trainer"] = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else None
        conf["pseudolabel"] = OmegaConf.to_container(cfg.pseudolabel, resolve=True)  # re-labelling rounds
        conf["k"] = int(cfg.cluster.k)
    return conf


def make_logger(rcfg: DictConfig, log_dir: Path | None, name: str):
    """``retrain.logger``: csv (default), tensorboard, or none."""
    kind = str(rcfg.get("logger", "csv") or "none").lower()
    if log_dir is None or kind in ("none", "false", "null"):
        return False
    import lightning as L

    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(str(log_dir), name=name)
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ConfigError("retrain.logger", "tensorboard is not installed (pip install tensorboard)") from e
        return L.pytorch.loggers.TensorBoardLogger(str(log_dir), name=name)
    raise ConfigError("retrain.logger", f"must be csv, tensorboard or none, got {kind!r}")



def test_positions(table: SampleTable, store) -> np.ndarray:
    """Positions into ``store.rows`` (an :class:`~ssl_pipeline.stages.encode.EmbeddingStore`) of labeled test rows."""
    y_true = np.asarray(table.y_true)
    return np.flatnonzero(table.test[store.rows] & (y_true[store.rows] >= 0))
