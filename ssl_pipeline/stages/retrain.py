"""Stage 4, retrain: a model on labeled + pseudo-labeled data vs the same model on labeled data only.

Both models are trained in the same run with the same seed, steps and optimizer, and evaluated
on the test split. Pseudo-labels are weighted by their confidence; those below
``retrain.min_confidence`` or flagged as noise (with ``retrain.drop_noisy``) are left out.

``retrain.mode``:

* ``head`` - a linear/MLP head on the cached embeddings (fast; the default). The labeled-only head
  is trained first; with ``retrain.pseudo_targets=auto`` (default) the pseudo-labeled head's recipe is
  the candidate with the lowest held-out log-loss on the validation folds
  (:mod:`ssl_pipeline.retrain.recipes`); ``retrain.ensemble`` linear heads are averaged into each model.
* ``finetune`` - the open_clip image tower plus a head trained on the images with Lightning
  (:class:`~ssl_pipeline.models.module.FinetuneModule`): frozen, last-N-blocks or full
  fine-tuning, weak augmentation, optional FixMatch consistency on unlabeled images, optional
  weight EMA, ``retrain.rounds`` rounds of retrain -> re-encode -> re-label. Lightning
  checkpoints go to ``<run_dir>/retrain/<phase>/checkpoints``; ``retrain.resume=true`` (or a
  run directory / ``.ckpt`` path) continues an interrupted run to the same final metrics.
  Runs on ``trainer.strategy=ddp trainer.devices=N`` (gloo on CPU).

Run directory (finetune)::

    retrain/key.txt                    the stage key the checkpoints belong to
    retrain/<phase>/checkpoints/       last.ckpt (every retrain.checkpoint_every steps)
    retrain/<phase>/model.pt, done.json  a finished phase (labeled_only, round1, round2, ...)
    retrain_logs/<phase>/version_*/    CSV (or TensorBoard) logs: train/loss, pseudo/weight_mean, val/acc

Artifact folder: head mode ``head.pt`` / ``head_labeled_only.pt``; finetune mode ``model.pt`` /
``model_labeled_only.pt`` (state dicts of tower + head), ``round<r>_pseudolabels.npz`` for the
re-labelled rounds; ``stage_metrics.json``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ssl_pipeline.artifacts import ArtifactCache, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.engine import DDPSection
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.retrain.common import (  # noqa: F401 - the stage's public names
    RUNTIME_KEYS,
    filter_pseudo,
    key_config,
    make_logger,
    select_training,
    soft_targets,
    test_positions,
    training_set,
)
from ssl_pipeline.retrain.head import accuracy, feature_stats, fit_head, run_head  # noqa: F401
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)


def run(cfg: DictConfig, table: SampleTable, store: EmbeddingStore, pl_dir: Path, cache: ArtifactCache,
        upstream: str, run_dir: Path, force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the retrain stage; return (artifact dir, metrics, key)."""
    rcfg = cfg.retrain
    if int(rcfg.steps) < 1:
        raise ConfigError("retrain.steps", f"must be >= 1, got {rcfg.steps}")
    mode = rcfg.get("mode", "head")
    if mode not in ("head", "finetune"):
        raise ConfigError("retrain.mode", f"must be head or finetune, got {mode!r}")
    key = cache.key("retrain", key_config(cfg), upstream)
    final = cache.path("retrain", key)
    if cache.is_complete("retrain", key) and not force:
        log.info("retrain: reusing %s", final)
        metrics = json.loads((final / "stage_metrics.json").read_text())
        _export_model(cfg, table, final, run_dir, metrics)
        return final, metrics, key
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    with DDPSection():  # DDP workers re-launched for this stage exit at its end; rank 0 writes the artifact
        if mode == "head":
            metrics, states = run_head(cfg, table, store, pl_dir, run_dir)
            arrays = {}
        else:
            from ssl_pipeline.retrain.finetune import Finetuner

            metrics, out = Finetuner(cfg, table, store, cache, key, run_dir).run(pl_dir)
            states, arrays = out["states"], out["arrays"]
    if "retrain/test_accuracy" in metrics:
        metrics["retrain/gain"] = metrics["retrain/test_accuracy"] - metrics["retrain/labeled_only_test_accuracy"]
    else:
        log.warning("retrain: no test split with labels; test accuracy is not reported "
                    "(set data.test_root / data.test_fraction, or a split column in the embeddings file)")
    metrics["retrain/seconds"] = round(time.perf_counter() - t0, 2)
    with cache.writing("retrain", key) as tmp:
        for name, sd in states.items():
            torch.save(sd, tmp / name)
        for name, arrs in arrays.items():
            np.savez(tmp / name, **arrs)
        write_json(tmp / "stage_metrics.json", metrics)
    _export_model(cfg, table, final, run_dir, metrics)
    return final, metrics, key


def _export_model(cfg, table, stage_dir: Path, run_dir: Path, metrics: dict) -> None:
    """Hook (model export): ``<run_dir>/model/`` from the retrain artifact, see :mod:`ssl_pipeline.model.export`."""
    from ssl_pipeline.model.export import export_retrain

    export_retrain(cfg, table, stage_dir, Path(run_dir), metrics)
