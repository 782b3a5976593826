"""Run the stages encode -> cluster -> pseudolabel -> retrain up to ``cfg.stage``.

Each stage reuses its cached artifact when its key (own config + upstream key)
is already complete; ``force=[stage, ...]`` (or ``force=all``) recomputes.
The run directory receives ``metrics.json`` (flat ``<stage>/<name>`` keys) and
``pseudolabels.csv``; a short table is printed at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, write_json
from ssl_pipeline.audit import pseudolabel_columns, write_pseudolabels
from ssl_pipeline.data.sources import build_table, draw_labeled
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.stages import cluster, encode, pseudolabel
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator banners, tips) out of the run's output; warnings still show."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        if lg.level in (logging.NOTSET, logging.DEBUG, logging.INFO):
            lg.setLevel(logging.WARNING)

STAGES = ["encode", "cluster", "pseudolabel", "retrain", "report"]


def validate(cfg: DictConfig) -> list[str]:
    """Check the cheap things first; return the stages to run, in order."""
    if cfg.stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r}; valid: {', '.join(STAGES)}")
    force = cfg.get("force") or []
    force = STAGES if force == "all" else list(force) if not isinstance(force, str) else [force]
    bad = [f for f in force if f not in STAGES]
    if bad:
        raise ConfigError("force", f"unknown stages {bad}; valid: {', '.join(STAGES)} or 'all'")
    return STAGES[: STAGES.index(cfg.stage) + 1]


def forced(cfg: DictConfig, stage: str) -> bool:
    f = cfg.get("force") or []
    if f == "all":
        return True
    return stage in ([f] if isinstance(f, str) else list(f))


def print_summary(metrics: dict, run_dir: Path) -> None:
    keys = ["encode/n_images", "encode/n_skipped", "encode/images_per_s", "cluster/n_clusters", "cluster/index",
            "pseudolabel/k", "pseudolabel/accuracy", "pseudolabel/accuracy_top50", "pseudolabel/coverage",
            "pseudolabel/precision", "pseudolabel/recall", "retrain/test_accuracy",
            "retrain/labeled_only_test_accuracy", "retrain/gain", "retrain/test_map", "retrain/labeled_only_test_map",
            "report/n_figures"]
    lines = [f"  {k:<40s} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"  {k:<40s} {metrics[k]}"
             for k in keys if k in metrics]
    print("\nssl_pipeline summary\n" + "\n".join(lines) + f"\n  run directory: {run_dir}\n", flush=True)


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the pipeline described by ``cfg``; write outputs to ``run_dir``; return the metrics."""
    if cfg.get("stage") == "predict":  # hook (model export): apply an exported model; no data/encode stages
        from ssl_pipeline.stages import predict

        return predict.run(cfg, run_dir)
    todo = validate(cfg)
    quiet_lightning()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = ArtifactCache(cfg.paths.cache_dir)
    t0 = time.perf_counter()
    table = build_table(cfg.data)
    metrics: dict = {}
    artifacts: dict[str, str] = {}
    if table.multilabel:
        from ssl_pipeline.multilabel.run import run as run_multilabel

        metrics.update(run_multilabel(cfg, table, cache, run_dir))
        if "report" in todo:
            finish(cfg, metrics, artifacts, run_dir, t0, quiet=True)
            from ssl_pipeline.stages import report

            metrics.update(report.run(cfg, table, run_dir, artifacts, metrics))
        return finish(cfg, metrics, artifacts, run_dir, t0)

    enc_dir, m, key = encode.run(cfg, table, cache, force=forced(cfg, "encode"))
    metrics.update(m)
    artifacts["encode"] = str(enc_dir)
    store = EmbeddingStore(enc_dir)
    available = np.zeros(len(table), bool)
    available[store.rows] = True
    if not available.all():
        log.warning("%d of %d images could not be read and were skipped (see skipped.csv)",
                    int((~available).sum()), len(table))
        draw_labeled(table, cfg.data, available)
    (run_dir / "skipped.csv").write_text((enc_dir / "skipped.csv").read_text())

    if "cluster" in todo:
        cl_dir, m, key = cluster.run(cfg, table, store, cache, key, force=forced(cfg, "cluster"))
        metrics.update(m)
        artifacts["cluster"] = str(cl_dir)
    if "pseudolabel" in todo:
        pl_dir, m, key = pseudolabel.run(cfg, table, store, cl_dir, cache, key, force=forced(cfg, "pseudolabel"))
        metrics.update(m)
        artifacts["pseudolabel"] = str(pl_dir)
        write_pseudolabels(pseudolabel_columns(table, pl_dir, cl_dir), run_dir)
    if "retrain" in todo:
        from ssl_pipeline.stages import retrain  # torch + Lightning: loaded only when a run retrains

        rt_dir, m, key = retrain.run(cfg, table, store, pl_dir, cache, key, run_dir, force=forced(cfg, "retrain"))
        metrics.update(m)
        artifacts["retrain"] = str(rt_dir)
    if "report" in todo:
        finish(cfg, metrics, artifacts, run_dir, t0, quiet=True)  # the report reads the run's files
        from ssl_pipeline.stages import report

        metrics.update(report.run(cfg, table, run_dir, artifacts, metrics))
    return finish(cfg, metrics, artifacts, run_dir, t0)


def finish(cfg: DictConfig, metrics: dict, artifacts: dict, run_dir: Path, t0: float, quiet: bool = False) -> dict:
    """Write metrics.json, artifacts.json and the resolved config into the run directory; print the summary."""
    metrics["pipeline/seconds"] = round(time.perf_counter() - t0, 2)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "artifacts.json", artifacts)
    OmegaConf.save(cfg, run_dir / "config_resolved.yaml", resolve=True)
    if not quiet:
        print_summary(metrics, run_dir)
    return metrics
