"""A Hydra multirun leaves summary.csv / summary.md with one row per job."""

from __future__ import annotations

import csv
import subprocess
import sys

from tests.conftest import ROOT, tiny_overrides


def test_multirun_writes_a_summary(tmp_path, image_root):
    sweep = tmp_path / "sweep"
    ov = [o for o in tiny_overrides(image_root) if not o.startswith("stage=")]
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", "-m", f"hydra.sweep.dir={sweep}", "stage=pseudolabel",
                        "pseudolabel=knn,prototype", f"paths.cache_dir={tmp_path / 'cache'}", *ov],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 2
    assert {r["overrides"].split("pseudolabel=")[1].split()[0] for r in rows} == {"knn", "prototype"}
    accs = [float(r["pseudolabel/accuracy"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    assert "pseudolabel/accuracy" in (sweep / "summary.md").read_text()
    # the second job reused the first job's embeddings and graph
    assert len(list((tmp_path / "cache" / "encode").iterdir())) == 1
