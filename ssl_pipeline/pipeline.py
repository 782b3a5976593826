"""Run the stages encode -> (adapt) -> cluster -> pseudolabel -> retrain -> report up to ``cfg.stage``.

Every stage is one object of :data:`REGISTRY` with the contract of
:mod:`ssl_pipeline.stages.base` (``key(ctx)``, ``run(ctx) -> StageResult``), the
same for single- and multi-label data. Each cached stage reuses its artifact
when its key (own config + upstream key) is already complete; ``force=[stage, ...]``
(or ``force=all``) recomputes. The run directory receives ``metrics.json`` (flat
``<stage>/<name>`` keys, ``val/*`` from held-out labeled rows), ``artifacts.json``
and ``pseudolabels.csv``; a short table is printed at the end.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from ssl_pipeline.artifacts import ArtifactCache
from ssl_pipeline.data.sources import build_table
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.stages.adapt import Adapt
from ssl_pipeline.stages.base import Context, Stage, write_run_files
from ssl_pipeline.stages.cluster import Cluster
from ssl_pipeline.stages.encode import Encode
from ssl_pipeline.stages.pseudolabel import Pseudolabel
from ssl_pipeline.stages.report import Report
from ssl_pipeline.stages.retrain_stage import Retrain

log = logging.getLogger(__name__)

REGISTRY: list[Stage] = [Encode(), Adapt(), Cluster(), Pseudolabel(), Retrain(), Report()]
STAGES = [s.name for s in REGISTRY]


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator banners, tips) out of the run's output; warnings still show."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        if lg.level in (logging.NOTSET, logging.DEBUG, logging.INFO):
            lg.setLevel(logging.WARNING)


def validate(cfg: DictConfig) -> list[str]:
    """Check the cheap things first; return the stages to run, in order."""
    if cfg.stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r}; valid: {', '.join(STAGES)}")
    force = cfg.get("force") or []
    force = STAGES if force == "all" else list(force) if not isinstance(force, str) else [force]
    bad = [f for f in force if f not in STAGES + ["all"]]
    if bad:
        raise ConfigError("force", f"unknown stages {bad}; valid: {', '.join(STAGES)} or 'all'")
    om = cfg.get("optimized_metric")
    if om is not None and not isinstance(om, str):
        raise ConfigError("optimized_metric", f"must be a metric name such as val/accuracy, got {om!r}")
    return STAGES[: STAGES.index(cfg.stage) + 1]


SUMMARY_KEYS = ["encode/n_images", "encode/n_skipped", "encode/images_per_s", "cluster/n_clusters", "cluster/index",
                "pseudolabel/k", "pseudolabel/accuracy", "pseudolabel/accuracy_top50", "pseudolabel/coverage",
                "pseudolabel/precision", "pseudolabel/recall", "val/accuracy", "val/map", "retrain/test_accuracy",
                "retrain/labeled_only_test_accuracy", "retrain/gain", "retrain/test_map",
                "retrain/labeled_only_test_map", "report/n_figures"]


def print_summary(metrics: dict, run_dir: Path) -> None:
    lines = [f"  {k:<40s} {metrics[k]:.4f}" if isinstance(metrics[k], float) else f"  {k:<40s} {metrics[k]}"
             for k in SUMMARY_KEYS if k in metrics]
    print("\nssl_pipeline summary\n" + "\n".join(lines) + f"\n  run directory: {run_dir}\n", flush=True)


def objective(cfg: DictConfig, metrics: dict) -> float | None:
    """The sweep objective: ``cfg.optimized_metric`` (default val/accuracy), else val/map; None when absent."""
    for k in (cfg.get("optimized_metric") or "val/accuracy", "val/accuracy", "val/map"):
        if isinstance(metrics.get(k), (int, float)):
            return float(metrics[k])
    return None


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Run the pipeline described by ``cfg``; write outputs to ``run_dir``; return the metrics."""
    if cfg.get("stage") == "predict":  # hook (model export): apply an exported model; no data/encode stages
        from ssl_pipeline.stages import predict

        return predict.run(cfg, run_dir)
    todo = validate(cfg)
    quiet_lightning()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    table = build_table(cfg.data)
    from ssl_pipeline.engine import check_trainer
    from ssl_pipeline.retrain.options import check_loss

    check_loss(cfg, table.multilabel)  # before any work: options that cannot run here stop at once
    check_trainer(cfg.get("trainer"))
    ctx = Context(cfg, table, ArtifactCache(cfg.paths.cache_dir), run_dir)
    if table.multilabel:
        ctx.metrics["data/n_missing"] = int(table.meta.get("n_missing", 0))
    for stage in REGISTRY:
        if stage.name not in todo:
            break
        result = stage.run(ctx)
        ctx.metrics.update(result.metrics)
        if result.path is not None:  # artifacts.json lists the cached stages' folders
            ctx.results[stage.name] = result
    ctx.metrics["pipeline/seconds"] = round(time.perf_counter() - t0, 2)
    write_run_files(ctx)
    print_summary(ctx.metrics, run_dir)
    return ctx.metrics
