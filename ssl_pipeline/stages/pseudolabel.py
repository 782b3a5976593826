"""Stage 3, pseudolabel: every unlabeled training sample gets a label, a confidence and a reason.

The labeler is ``hydra.utils.instantiate(cfg.pseudolabel.labeler)``, any
scikit-learn-style estimator following :mod:`ssl_pipeline.labeling.base`.

Artifact folder (arrays aligned with the cluster stage's ``rows.npy``)::

    rows.npy labels.npy confidence.npy tier.npy noise.npy agreement.npy labeled.npy
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, array_hash, atomic_save_npy, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.labeling.calibration import expected_calibration_error
from ssl_pipeline.stages.cluster import load_graph, load_rows
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)


def score(labels: np.ndarray, confidence: np.ndarray, y_true: np.ndarray, unlabeled: np.ndarray) -> dict:
    """Pseudo-label metrics over the unlabeled rows whose truth is known.

    ``accuracy_top50`` is the accuracy of the most confident half: above
    ``accuracy`` when the confidence ranks errors last.
    """
    m = {"pseudolabel/n_unlabeled": int(unlabeled.sum()),
         "pseudolabel/coverage": float((labels[unlabeled] >= 0).mean()) if unlabeled.any() else 0.0}
    known = unlabeled & (y_true >= 0)
    if known.any():
        correct = labels[known] == y_true[known]
        m["pseudolabel/accuracy"] = float(correct.mean())
        order = np.argsort(-confidence[known], kind="stable")
        top = order[: max(1, len(order) // 2)]
        m["pseudolabel/accuracy_top50"] = float(correct[top].mean())
        m["pseudolabel/ece"] = expected_calibration_error(confidence[known], correct)
        m["pseudolabel/n_scored"] = int(known.sum())
    if unlabeled.any():
        m["pseudolabel/mean_confidence"] = float(confidence[unlabeled].mean())
    return m


def run(cfg: DictConfig, table: SampleTable, store: EmbeddingStore, cluster_dir: Path, cache: ArtifactCache,
        upstream: str, force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the pseudolabel stage; return (artifact dir, metrics, key)."""
    if table.multilabel:
        raise ConfigError("pseudolabel", "multi-label data is labeled by the multilabel path, not this stage")
    rows = np.load(cluster_dir / "rows.npy")
    y = table.y[rows]
    labeled = y >= 0
    if not labeled.any():
        raise ConfigError("data", "no labeled training sample; check data.labeled_per_class / the y column")
    if labeled.all():
        raise ConfigError("data", "every training sample is labeled: nothing to pseudo-label")
    pcfg = OmegaConf.to_container(cfg.pseudolabel, resolve=True)
    # class-name text embeddings (C, D): the encode stage's (text tower) or the embeddings file's ``text``
    text = store.text_embeddings()
    if text is None:
        text = table.meta.get("text")
    key_parts = {"cfg": pcfg, "labels": array_hash(y)}
    if text is not None:
        key_parts["text"] = array_hash(np.asarray(text, np.float32))
    key = cache.key("pseudolabel", key_parts, upstream)
    final = cache.path("pseudolabel", key)
    if cache.is_complete("pseudolabel", key) and not force:
        log.info("pseudolabel: reusing %s", final)
        return final, json.loads((final / "stage_metrics.json").read_text()), key
    if "labeler" not in cfg.pseudolabel:
        raise ConfigError("pseudolabel.labeler", "missing: a _target_ estimator class is required")
    labeler = instantiate(cfg.pseudolabel.labeler)
    pos_in_store = np.searchsorted(store.rows, rows)
    X = load_rows(store, pos_in_store)  # float16 memory map (labelers that need float32 make their copy)
    graph = load_graph(cluster_dir)
    log.info("pseudolabel: %s on %d points (%d labeled)", type(labeler).__name__, len(X), int(labeled.sum()))
    t0 = time.perf_counter()
    if text is not None and "text" in inspect.signature(labeler.fit).parameters:
        labeler.fit(X, y, neighbors=graph, text=text)
    else:
        labeler.fit(X, y, neighbors=graph)
    seconds = time.perf_counter() - t0
    n = len(rows)
    labels = np.asarray(labeler.labels_, np.int64)
    conf = np.asarray(labeler.confidence_, np.float32)
    tier = np.asarray(getattr(labeler, "tier_", np.where(labeled, 0, 1)), np.int64)
    noise = np.asarray(getattr(labeler, "noise_", np.zeros(n, bool)), bool)
    agreement = getattr(labeler, "agreement_", None)
    if agreement is None:
        idx = graph.idx
        valid = idx >= 0
        agreement = (labels[np.where(valid, idx, 0)] == labels[:, None]).sum(1) / np.maximum(valid.sum(1), 1)
    agreement = np.asarray(agreement, np.float32)
    metrics = score(labels, conf, np.asarray(table.y_true)[rows], ~labeled)
    metrics["pseudolabel/n_labeled"] = int(labeled.sum())
    metrics["pseudolabel/n_noise"] = int(noise[~labeled].sum())
    metrics["pseudolabel/seconds"] = round(seconds, 2)
    metrics["pseudolabel/text"] = int(text is not None)
    for attr, name in (("k_", "k"), ("n_clusters_", "n_clusters"), ("delta_k_", "delta_k"), ("n_tiers_", "n_tiers")):
        if hasattr(labeler, attr):
            metrics[f"pseudolabel/{name}"] = float(getattr(labeler, attr))
    with cache.writing("pseudolabel", key) as tmp:
        for name, arr in (("rows", rows), ("labels", labels), ("confidence", conf), ("tier", tier),
                          ("noise", noise), ("agreement", agreement), ("labeled", labeled)):
            atomic_save_npy(tmp / f"{name}.npy", arr)
        write_json(tmp / "stage_metrics.json", metrics)
        write_json(tmp / "labeler.json", {"name": cfg.pseudolabel.get("name", type(labeler).__name__),
                                          "class": type(labeler).__name__, "params": pcfg})
    return final, metrics, key
