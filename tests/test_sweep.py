"""A Hydra multirun leaves summary.csv / summary.md with one row per job, sorted by the objective (val/*)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from omegaconf import OmegaConf

from ssl_pipeline.callbacks import summarise
from tests.conftest import ROOT, tiny_overrides


def test_multirun_writes_a_summary_sorted_by_val_accuracy(tmp_path, image_root):
    sweep = tmp_path / "sweep"
    ov = [o for o in tiny_overrides(image_root) if not o.startswith("stage=")]
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", "-m", f"hydra.sweep.dir={sweep}", "stage=pseudolabel",
                        "pseudolabel=knn,prototype", f"paths.cache_dir={tmp_path / 'cache'}", *ov],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2
    assert {r["overrides"].split("pseudolabel=")[1].split()[0] for r in rows} == {"knn", "prototype"}
    assert list(rows[0])[3] == "val/accuracy"  # the objective is the first metric column
    vals = [float(r["val/accuracy"]) for r in rows]
    assert vals == sorted(vals, reverse=True)
    assert all(r["pseudolabel/accuracy"] for r in rows)  # test-side metrics are reported beside it
    assert "sorted by val/accuracy" in (sweep / "summary.md").read_text()
    # the second job reused the first job's embeddings and graph
    assert len(list((tmp_path / "cache" / "encode").iterdir())) == 1


def _job(sweep, name: str, metrics: dict | None) -> None:
    (sweep / name / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create([f"job={name}"]), sweep / name / ".hydra" / "overrides.yaml")
    if metrics is not None:
        (sweep / name / "metrics.json").write_text(json.dumps(metrics))


def test_summary_sorts_by_the_optimized_metric_never_by_test(tmp_path):
    _job(tmp_path, "0", {"val/accuracy": 0.5, "retrain/test_accuracy": 0.9})
    _job(tmp_path, "1", {"val/accuracy": 0.8, "retrain/test_accuracy": 0.1})
    _job(tmp_path, "2", None)  # a failed job comes last
    summarise(tmp_path, "val/accuracy")
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["job"] for r in rows] == ["1", "0", "2"] and rows[2]["status"] == "failed"
    # an objective no job has (a multi-label sweep with the default) falls back to val/map
    ml = tmp_path / "ml"
    _job(ml, "0", {"val/map": 0.3})
    _job(ml, "1", {"val/map": 0.6})
    summarise(ml, "val/accuracy")
    assert [r["job"] for r in csv.DictReader((ml / "summary.csv").open())] == ["1", "0"]
