"""Hydra callbacks: a summary table of every job of a multirun sweep."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# the objective first (val/* from held-out labeled rows), then what is reported beside it (never optimised)
OBJECTIVES = ("val/accuracy", "val/map")
MAIN_METRICS = (*OBJECTIVES, "retrain/test_accuracy", "retrain/test_map", "pseudolabel/accuracy",
                "pseudolabel/precision")


def collect(sweep_dir: Path) -> list[dict]:
    """One dict per job folder under ``sweep_dir``: its overrides and its metrics.json."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        ov_file = job / ".hydra" / "overrides.yaml"
        if not ov_file.exists():
            continue
        overrides = [str(o) for o in OmegaConf.load(ov_file)]
        mf = job / "metrics.json"
        metrics = json.loads(mf.read_text()) if mf.exists() else {}
        rows.append({"job": job.name, "overrides": " ".join(overrides), "status": "ok" if mf.exists() else "failed",
                     **metrics})
    return rows


def summarise(sweep_dir: str | Path, metric: str = "auto") -> Path | None:
    """Write ``summary.csv`` and ``summary.md`` into ``sweep_dir`` sorted by ``metric`` (best first).

    ``metric``: the sweep's ``optimized_metric``; when no job has it, val/accuracy
    then val/map; ``auto``: the first of :data:`MAIN_METRICS` that a job has.
    Jobs without the metric (failed ones) come last.
    """
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    if not rows:
        return None
    order = MAIN_METRICS if metric == "auto" else (metric, *OBJECTIVES)
    metric = next((m for m in order if any(m in r for r in rows)), "")
    rows.sort(key=lambda r: -float(r[metric]) if isinstance(r.get(metric), (int, float)) else float("inf"))
    cols = ["job", "overrides", "status"] + ([metric] if metric else [])
    cols += sorted({k for r in rows for k in r} - set(cols))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", restval="")
    w.writeheader()
    w.writerows(rows)
    (sweep_dir / "summary.csv").write_text(buf.getvalue())
    short = cols[:3] + [c for c in cols[3:] if c in (metric, *MAIN_METRICS, "pseudolabel/accuracy_top50",
                                                       "retrain/labeled_only_test_accuracy")]
    md = ["| " + " | ".join(short) + " |", "|" + "---|" * len(short)]
    for r in rows:
        md.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                                    for c in short) + " |")
    (sweep_dir / "summary.md").write_text(f"# Sweep summary (sorted by {metric or 'job'})\n\n" + "\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return sweep_dir / "summary.csv"


class SweepSummary(Callback):
    """After a multirun, write ``summary.csv`` / ``summary.md`` into the sweep directory."""

    def __init__(self, metric: str = "auto"):
        self.metric = metric

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = summarise(config.hydra.sweep.dir, self.metric)
        if path:
            log.info("sweep summary written to %s", path)
