"""Stage 4, retrain: a head on labeled + pseudo-labeled embeddings vs the same head on labeled data only.

Both models are trained in the same run with the same seed, steps and
optimizer, and evaluated on the test split. Pseudo-labels are weighted by their
confidence; those below ``retrain.min_confidence`` or flagged as noise (with
``retrain.drop_noisy``) are left out.

Artifact folder: ``head.pt`` / ``head_labeled_only.pt`` (state dicts),
``stage_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.models.module import HeadModule
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)


def training_set(pl_dir: Path, rcfg: DictConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, weights, is_pseudo) of the samples the semi-supervised model trains on."""
    rows = np.load(pl_dir / "rows.npy")
    labels = np.load(pl_dir / "labels.npy")
    conf = np.load(pl_dir / "confidence.npy").astype(np.float32)
    labeled = np.load(pl_dir / "labeled.npy")
    noise = np.load(pl_dir / "noise.npy")
    keep = labeled | ((labels >= 0) & (conf >= float(rcfg.min_confidence)))
    if rcfg.get("drop_noisy", True):
        keep &= labeled | ~noise
    w = np.where(labeled, 1.0, conf).astype(np.float32)
    return rows[keep], labels[keep], w[keep], ~labeled[keep]


def fit_head(X: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int, cfg: DictConfig, seed: int,
             log_dir: Path | None = None, name: str = "head") -> HeadModule:
    """Train a :class:`HeadModule` for ``retrain.steps`` optimizer steps with Lightning; return it (eval mode)."""
    rcfg = cfg.retrain
    L.seed_everything(seed, workers=True, verbose=False)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(w))
    bs = int(rcfg.batch_size)
    steps = int(rcfg.steps)
    # one long epoch of `steps` batches drawn with replacement: the same number of optimizer steps
    # whatever the training-set size (a labeled-only set of 40 gets as many updates as 4,000 pseudo-labels)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=steps * bs,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler)
    loss = instantiate(cfg.loss) if "_target_" in cfg.loss else None
    module = HeadModule(X.shape[1], n_classes, head=rcfg.head, hidden=int(rcfg.hidden), lr=float(rcfg.lr),
                        weight_decay=float(rcfg.weight_decay), dropout=float(rcfg.get("dropout", 0.0)), loss=loss,
                        max_steps=steps)
    logger = L.pytorch.loggers.CSVLogger(str(log_dir), name=name) if log_dir else False
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True, log_every_n_steps=50)
    trainer.fit(module, loader)
    return module.eval()


@torch.no_grad()
def accuracy(module: HeadModule, X: np.ndarray, y: np.ndarray) -> float:
    pred = module(torch.from_numpy(X)).argmax(-1).numpy()
    return float((pred == y).mean())


def run(cfg: DictConfig, table: SampleTable, store: EmbeddingStore, pl_dir: Path, cache: ArtifactCache,
        upstream: str, run_dir: Path, force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the retrain stage; return (artifact dir, metrics, key)."""
    rcfg = cfg.retrain
    if int(rcfg.steps) < 1:
        raise ConfigError("retrain.steps", f"must be >= 1, got {rcfg.steps}")
    conf = {"retrain": OmegaConf.to_container(rcfg, resolve=True), "loss": OmegaConf.to_container(cfg.loss),
            "seed": int(cfg.seed)}
    key = cache.key("retrain", conf, upstream)
    final = cache.path("retrain", key)
    if cache.is_complete("retrain", key) and not force:
        log.info("retrain: reusing %s", final)
        return final, json.loads((final / "stage_metrics.json").read_text()), key
    t0 = time.perf_counter()
    emb = store.load()
    pos_of = {int(r): i for i, r in enumerate(store.rows)}
    rows, labels, w, is_pseudo = training_set(pl_dir, rcfg)
    X = emb[[pos_of[int(r)] for r in rows]]
    n_classes = len(table.classes)
    y_true = np.asarray(table.y_true)
    test_pos = np.flatnonzero(table.test[store.rows] & (y_true[store.rows] >= 0))
    seed = int(cfg.seed)
    log.info("retrain: head on %d samples (%d pseudo-labeled) vs %d labeled only", len(rows), int(is_pseudo.sum()),
             int((~is_pseudo).sum()))
    semi = fit_head(X, labels, w, n_classes, cfg, seed, run_dir / "retrain_logs", "semi_supervised")
    lab_only = fit_head(X[~is_pseudo], labels[~is_pseudo], np.ones((~is_pseudo).sum(), np.float32), n_classes, cfg,
                        seed, run_dir / "retrain_logs", "labeled_only")
    metrics = {"retrain/n_train": len(rows), "retrain/n_pseudo": int(is_pseudo.sum()),
               "retrain/pseudo_weight_mean": float(w[is_pseudo].mean()) if is_pseudo.any() else 0.0}
    if len(test_pos):
        Xt, yt = emb[test_pos], y_true[store.rows[test_pos]]
        metrics["retrain/test_accuracy"] = accuracy(semi, Xt, yt)
        metrics["retrain/labeled_only_test_accuracy"] = accuracy(lab_only, Xt, yt)
        metrics["retrain/gain"] = metrics["retrain/test_accuracy"] - metrics["retrain/labeled_only_test_accuracy"]
        metrics["retrain/n_test"] = len(test_pos)
    else:
        log.warning("retrain: no test split with labels; test accuracy is not reported "
                    "(set data.test_root / data.test_fraction, or a split column in the embeddings file)")
    metrics["retrain/seconds"] = round(time.perf_counter() - t0, 2)
    with cache.writing("retrain", key) as tmp:
        torch.save(semi.state_dict(), tmp / "head.pt")
        torch.save(lab_only.state_dict(), tmp / "head_labeled_only.pt")
        write_json(tmp / "stage_metrics.json", metrics)
    return final, metrics, key
