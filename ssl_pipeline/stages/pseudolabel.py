"""Stage 3, pseudolabel: every unlabeled training sample gets a label, a confidence and a reason.

The labeler is ``hydra.utils.instantiate(cfg.pseudolabel.labeler)``, any
scikit-learn-style estimator following :mod:`ssl_pipeline.labeling.base`; on
multi-label data ``cfg.multilabel.labeler`` (:class:`ssl_pipeline.multilabel.labeler.CSALabeler`).
The main fit sees every label; the ``val/*`` metrics come from extra fits with a
held-out fold of the labeled rows hidden (:mod:`ssl_pipeline.validation`).

Artifact folder (arrays aligned with the cluster stage's ``rows.npy``)::

    rows.npy labels.npy confidence.npy tier.npy noise.npy agreement.npy labeled.npy
    val/fold<f>/           the same arrays for a validation fit (held-out rows removed) + heldout_rows.npy
"""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline import validation
from ssl_pipeline.artifacts import array_hash, write_json
from ssl_pipeline.audit import pseudolabel_columns, write_pseudolabels
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.labeling.calibration import expected_calibration_error
from ssl_pipeline.stage_io import load_graph, load_rows, write_arrays
from ssl_pipeline.stages.base import CachedStage, Context, StageResult

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


def class_text(ctx: Context) -> np.ndarray | None:
    """Class-name text embeddings (C, D), class order: the encode stage's (text tower) or the embeddings file's."""
    text = ctx.state.get("label_store", ctx.state["store"]).text_embeddings()
    return text if text is not None else ctx.table.meta.get("text")


def _fit_labeler(cfg: DictConfig, X: np.ndarray, y: np.ndarray, graph, text: np.ndarray | None = None,
                 labeler=None):
    """Fit ``labeler`` (default: a new ``cfg.pseudolabel.labeler``); ``text`` reaches labelers whose fit takes it."""
    labeler = instantiate(cfg.pseudolabel.labeler) if labeler is None else labeler
    if text is not None and "text" in inspect.signature(labeler.fit).parameters:
        labeler.fit(X, y, neighbors=graph, text=text)
    else:
        labeler.fit(X, y, neighbors=graph)
    return labeler


def _arrays(labeler, rows: np.ndarray, labeled: np.ndarray, graph) -> dict[str, np.ndarray]:
    """The pseudolabel folder's arrays (see :data:`ssl_pipeline.stage_io.PSEUDO_ARRAYS`) from a fitted labeler."""
    n = len(rows)
    labels = np.asarray(labeler.labels_, np.int64)
    agreement = getattr(labeler, "agreement_", None)
    if agreement is None:
        idx = graph.idx
        valid = idx >= 0
        agreement = (labels[np.where(valid, idx, 0)] == labels[:, None]).sum(1) / np.maximum(valid.sum(1), 1)
    return {"rows": rows, "labels": labels, "confidence": np.asarray(labeler.confidence_, np.float32),
            "tier": np.asarray(getattr(labeler, "tier_", np.where(labeled, 0, 1)), np.int64),
            "noise": np.asarray(getattr(labeler, "noise_", np.zeros(n, bool)), bool),
            "agreement": np.asarray(agreement, np.float32), "labeled": labeled}


def validation_sample(X, y: np.ndarray, rows: np.ndarray, graph, max_rows: int, seed: int):
    """(X, y, rows, graph) of a seeded uniform sample of ``max_rows`` graph rows, with its own exact kNN graph.

    Above ``val.max_rows`` rows the validation fit runs on such a sample (labeled
    and unlabeled rows drawn alike, so the share of labels is kept) with one
    held-out split, which bounds its cost at scale; the main fit always sees every
    row. The sample's graph is sparser than the full one, so its ``val/accuracy``
    is lower than the full run's accuracy (200k synthetic rows: 0.68 vs 0.97): it
    ranks labelers, it does not estimate the full run's accuracy.
    """
    if not max_rows or len(rows) <= max_rows:
        return X, y, rows, graph
    from ssl_pipeline.labeling.knn import as_unit_rows, knn_graph

    pick = np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))
    Xs = np.asarray(X[pick])
    log.info("pseudolabel: validation fits on a sample of %d of %d rows (val.max_rows)", max_rows, len(rows))
    return Xs, y[pick], rows[pick], knn_graph(as_unit_rows(Xs), graph.k)


def validate_labeler(cfg: DictConfig, X, y: np.ndarray, rows: np.ndarray, graph, out: Path,
                     text: np.ndarray | None = None) -> dict:
    """Refit the labeler with each held-out fold of labeled rows hidden; score the fold (``val/*`` metrics).

    The first ``val.retrain_folds`` folds are written as pseudolabel-like folders
    ``out/val/fold<f>/`` (rows without the held-out ones, plus ``heldout_rows.npy``)
    for the retrain stage's validation head.
    """
    vs = validation.settings(cfg)
    if not validation.single_label_folds(y, vs):
        return {}
    t0 = time.perf_counter()
    n_rows = len(rows)
    X, y, rows, graph = validation_sample(X, y, rows, graph, int(vs["max_rows"]), int(vs["seed"]))
    if len(rows) < n_rows:  # a sample: one held-out split (one extra fit), whatever its number of labels
        vs = dict(vs, kfold_below=0)
    folds = validation.single_label_folds(y, vs)

    def fold_fit(held: np.ndarray):
        y_f = y.copy()
        y_f[held] = -1
        return y_f, _fit_labeler(cfg, X, y_f, graph, text)

    workers = validation.n_workers(vs, len(folds))
    if workers > 1:  # independent seeded fits: threads (numpy, scipy and faiss release the GIL), one BLAS thread each
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        log.info("pseudolabel: %d validation fits in %d threads", len(folds), workers)
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as pool:
            fits = list(pool.map(fold_fit, folds))
    else:
        fits = [fold_fit(held) for held in folds]
    correct = total = 0
    for f, (held, (y_f, lab)) in enumerate(zip(folds, fits)):
        pred = np.asarray(lab.labels_, np.int64)[held]
        correct += int((pred == y[held]).sum())
        total += len(held)
        if f < int(vs["retrain_folds"]):
            arrs = _arrays(lab, rows, y_f >= 0, graph)
            keep = np.ones(len(rows), bool)
            keep[held] = False
            fold_dir = out / "val" / f"fold{f}"
            fold_dir.mkdir(parents=True)
            write_arrays(fold_dir, {k: v[keep] for k, v in arrs.items()})
            write_arrays(fold_dir, {"heldout_rows": rows[held]})
    log.info("pseudolabel: validation on %d held-out labeled rows in %d fold(s): accuracy %.4f", total, len(folds),
             correct / total)
    return {"val/accuracy": correct / total, "val/pseudolabel_accuracy": correct / total, "val/n_heldout": total,
            "val/folds": len(folds), "val/n_rows": len(rows), "val/seconds": round(time.perf_counter() - t0, 2)}


class Pseudolabel(CachedStage):
    """Stage 3: a labeler (``_target_``: ``cfg.pseudolabel.labeler``, or ``cfg.multilabel.labeler`` on multi-label
    data) labels every unlabeled training row; held-out folds of the labeled rows give ``val/*``."""

    name = "pseudolabel"

    def check(self, ctx: Context) -> None:
        validation.settings(ctx.cfg)
        if ctx.table.multilabel:
            return
        rows = np.load(ctx.path("cluster") / "rows.npy")
        labeled = ctx.table.y[rows] >= 0
        if not labeled.any():
            raise ConfigError("data", "no labeled training sample; check data.labeled_per_class / the y column")
        if labeled.all():
            raise ConfigError("data", "every training sample is labeled: nothing to pseudo-label")
        if "labeler" not in ctx.cfg.pseudolabel:
            raise ConfigError("pseudolabel.labeler", "missing: a _target_ estimator class is required")

    def key(self, ctx: Context) -> str:
        cfg, table = ctx.cfg, ctx.table
        val = validation.settings(cfg)
        if table.multilabel:
            from ssl_pipeline.multilabel.settings import settings

            conf = {"ml": settings(cfg), "labeler": OmegaConf.to_container(cfg.multilabel.get("labeler", {}),
                                                                          resolve=True), "seed": int(cfg.seed)}
            labels = array_hash(np.where(table.labeled[:, None], np.asarray(table.y_true), -1).astype(np.int8))
        else:
            conf = OmegaConf.to_container(cfg.pseudolabel, resolve=True)
            labels = array_hash(table.y[np.load(ctx.path("cluster") / "rows.npy")])
        val = {k: v for k, v in val.items() if k not in validation.RESULT_FREE}
        parts = {"cfg": conf, "labels": labels, "val": val}
        text = None if table.multilabel else class_text(ctx)
        if text is not None:
            parts["text"] = array_hash(np.asarray(text, np.float32))
        return ctx.cache.key("pseudolabel", parts, ctx.key_of("cluster"))

    def build(self, ctx: Context, out: Path) -> dict:
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.recipe import build_pseudolabels

            return build_pseudolabels(ctx, out)
        cfg, table, cluster_dir = ctx.cfg, ctx.table, ctx.path("cluster")
        store = ctx.state.get("label_store", ctx.state["store"])  # the adapted space when adapt != none
        rows = np.load(cluster_dir / "rows.npy")
        y = table.y[rows]
        labeled = y >= 0
        X = load_rows(store, np.searchsorted(store.rows, rows))  # float16 memory map (float32 copies: labelers)
        graph = load_graph(cluster_dir)
        text = class_text(ctx)
        labeler = instantiate(cfg.pseudolabel.labeler)  # imports its module: not part of the fit's seconds
        t0 = time.perf_counter()
        labeler = _fit_labeler(cfg, X, y, graph, text, labeler)
        seconds = time.perf_counter() - t0
        log.info("pseudolabel: %s on %d points (%d labeled)", type(labeler).__name__, len(X), int(labeled.sum()))
        arrs = _arrays(labeler, rows, labeled, graph)
        metrics = score(arrs["labels"], arrs["confidence"], np.asarray(table.y_true)[rows], ~labeled)
        metrics["pseudolabel/n_labeled"] = int(labeled.sum())
        metrics["pseudolabel/n_noise"] = int(arrs["noise"][~labeled].sum())
        metrics["pseudolabel/seconds"] = round(seconds, 2)
        metrics["pseudolabel/text"] = int(text is not None)
        for attr, name in (("k_", "k"), ("n_clusters_", "n_clusters"), ("delta_k_", "delta_k"),
                           ("n_tiers_", "n_tiers")):
            if hasattr(labeler, attr):
                metrics[f"pseudolabel/{name}"] = float(getattr(labeler, attr))
        write_arrays(out, arrs)
        write_json(out / "labeler.json", {"name": cfg.pseudolabel.get("name", type(labeler).__name__),
                                          "class": type(labeler).__name__,
                                          "params": OmegaConf.to_container(cfg.pseudolabel, resolve=True)})
        metrics.update(validate_labeler(cfg, X, y, rows, graph, out, text))
        return metrics

    def export(self, ctx: Context, result: StageResult) -> None:
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.exports import export_pseudolabels

            export_pseudolabels(ctx.table, result.path, ctx.run_dir)
        else:
            write_pseudolabels(pseudolabel_columns(ctx.table, result.path, ctx.path("cluster")), ctx.run_dir)
