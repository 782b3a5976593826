"""The report views, the report stage and the inspection notebook, on one tiny run of the real pipeline."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssl_pipeline import pipeline, report
from ssl_pipeline.data.sources import build_table
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.stages import report as report_stage
from tests.conftest import ROOT, make_config, make_image_folder, tiny_overrides

NOTEBOOK = ROOT / "notebooks" / "inspect_clusters.ipynb"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """One tiny image-folder run (3 classes x 10 train images, tiny CLIP) through every stage."""
    base = tmp_path_factory.mktemp("report")
    images = make_image_folder(base / "images")
    # the knn labeler (one tier, no noise flags): the tier and noise views are exercised separately below
    cfg = make_config(*tiny_overrides(images), "pseudolabel=knn", cache_dir=base / "cache")
    run_dir = base / "run"
    metrics = pipeline.run(cfg, run_dir)
    artifacts = json.loads((run_dir / "artifacts.json").read_text())
    return {"base": base, "cfg": cfg, "run_dir": run_dir, "metrics": metrics, "artifacts": artifacts}


def stage(tiny_run: dict, out: Path, artifacts: dict | None = None, table: SampleTable | None = None,
          metrics: dict | None = None) -> dict:
    cfg = tiny_run["cfg"]
    return report_stage.run(cfg, table if table is not None else build_table(cfg.data), out,
                            artifacts if artifacts is not None else tiny_run["artifacts"],
                            metrics=tiny_run["metrics"] if metrics is None else metrics)


def test_report_stage_writes_pngs_and_a_self_contained_html(tiny_run):
    run_dir = tiny_run["run_dir"]
    m = stage(tiny_run, run_dir)
    assert m["report/n_failed"] == 0
    # knn labeler: no tiers, no noise flags; single-label: no multi-label decisions; everything else applies
    assert m["report/n_figures"] == len(report.VIEWS) - 3 and m["report/n_skipped"] == 3
    pngs = sorted((run_dir / "report").glob("*.png"))
    assert len(pngs) == m["report/n_figures"]
    assert {p.stem.split("_", 1)[1] for p in pngs} >= {"map_clusters", "map_labels", "map_correct",
                                                       "cluster_thumbnails", "class_quality", "least_confident",
                                                       "calibration"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    page = (run_dir / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == len(pngs)
    assert "http://" not in page and "https://" not in page
    assert "pseudolabel/accuracy" in page and "precision" in page  # metrics and per-class tables
    assert "do not apply" in page and "tiers" in page


def test_load_run_tables_and_map(tiny_run):
    run = report.load_run(tiny_run["run_dir"])
    m = tiny_run["metrics"]
    assert len(run) == 30 and run.embeddings.shape[0] == 30 and run.notes == []
    assert run.single_label and run.has_truth and run.has_images and run.knn is not None
    assert len(run.pseudolabels) == m["pseudolabel/n_unlabeled"] == int(run.unlabeled.sum())
    rows = report.class_table(run)
    assert [r["class"] for r in rows] == ["blue", "green", "red"]
    assert sum(r["n_pseudo"] for r in rows) == m["pseudolabel/n_unlabeled"]
    assert sum(r["n_correct"] for r in rows) / sum(r["n_true"] for r in rows) == pytest.approx(
        m["pseudolabel/accuracy"])
    cal = report.calibration_table(run)
    assert sum(r["n"] for r in cal) == m["pseudolabel/n_scored"]
    nb = report.neighbour_table(run, "least_confident", n=3, k=4)
    assert len(nb) == 3 and all(len(r["neighbours"]) == 4 for r in nb)
    assert nb[0]["confidence"] <= nb[-1]["confidence"]
    a = report.embedding_map(run, method="pca", max_points=20, seed=1)
    b = report.embedding_map(run, method="pca", max_points=20, seed=1)
    assert a.xy.shape == (20, 2) and np.array_equal(a.pos, b.pos) and np.allclose(a.xy, b.xy)
    assert run.labeled[a.pos].sum() >= 20 // 10  # given labels kept on the map (up to a tenth of it)
    assert report.draw_view(run, "tiers", quiet=True) is None
    # without the sample table (data moved): classes and truth come from pseudolabels.csv, no images
    blind = report.from_artifacts(tiny_run["artifacts"], pseudolabels=run.pseudolabels, embeddings=False)
    assert blind.classes == run.classes and not blind.has_images and blind.embeddings is None
    assert np.array_equal(blind.correct, run.correct)


def test_tier_and_noise_views_when_the_labeler_provides_them(tiny_run, tmp_path):
    """An HDL-like pseudolabel artifact (several tiers, noise flags) turns on the tier and noise views."""
    pl = tmp_path / "pl"
    shutil.copytree(tiny_run["artifacts"]["pseudolabel"], pl)
    labeled = np.load(pl / "labeled.npy")
    unl = np.flatnonzero(~labeled)
    tier = np.zeros(len(labeled), np.int64)
    tier[unl] = 1 + np.arange(len(unl)) % 3
    noise = np.zeros(len(labeled), bool)
    noise[unl[:2]] = True
    np.save(pl / "tier.npy", tier)
    np.save(pl / "noise.npy", noise)
    arts = dict(tiny_run["artifacts"], pseudolabel=str(pl))
    m = stage(tiny_run, tmp_path / "run", arts)
    assert m["report/n_failed"] == 0 and m["report/n_skipped"] == 1  # the multi-label view
    assert m["report/n_figures"] == len(report.VIEWS) - 1
    names = {p.stem.split("_", 1)[1] for p in (tmp_path / "run" / "report").glob("*.png")}
    assert {"tiers", "noise"} <= names
    run = report.from_artifacts(arts, table=build_table(tiny_run["cfg"].data), metrics=tiny_run["metrics"])
    tiers = report.tier_table(run)
    assert [t["tier"] for t in tiers] == [1, 2, 3] and sum(t["n"] for t in tiers) == len(unl)
    assert sum(t["n_noise"] for t in tiers) == 2


def test_views_that_do_not_apply_are_skipped_not_fatal(tiny_run, tmp_path):
    arts = tiny_run["artifacts"]
    table = build_table(tiny_run["cfg"].data)
    # a stage=cluster run: no pseudo-labels
    m = stage(tiny_run, tmp_path / "cluster_only", {k: arts[k] for k in ("encode", "cluster")}, metrics={})
    assert m["report/n_failed"] == 0 and m["report/n_figures"] == 2  # cluster map and thumbnails
    assert "do not apply" in (tmp_path / "cluster_only" / "report.html").read_text()
    # an embeddings-file-like table (no images) whose truth is unknown
    blind = SampleTable(ids=table.ids, paths=[None] * len(table), split=table.split,
                        y_true=np.where(table.labeled, table.y_true, -1), labeled=table.labeled,
                        classes=table.classes)
    m = stage(tiny_run, tmp_path / "blind", table=blind)
    assert m["report/n_failed"] == 0 and m["report/n_figures"] == 3  # two maps and per-class counts
    # a multi-label table with (N, C) pseudo-labels
    pl = tmp_path / "pl_multi"
    shutil.copytree(arts["pseudolabel"], pl)
    n, c = len(np.load(pl / "rows.npy")), len(table.classes)
    np.save(pl / "labels.npy", np.eye(c, dtype=np.int64)[np.arange(n) % c])
    np.save(pl / "confidence.npy", np.full((n, c), 0.5, np.float32))
    multi = SampleTable(ids=table.ids, paths=table.paths, split=table.split,
                        y_true=np.eye(c, dtype=np.int8)[table.y_true], labeled=table.labeled,
                        classes=table.classes, multilabel=True)
    m = stage(tiny_run, tmp_path / "multi", dict(arts, pseudolabel=str(pl)), table=multi)
    assert m["report/n_failed"] == 0 and m["report/n_figures"] == 2


def test_latest_run_picks_the_newest_finished_run(tmp_path):
    for name, t in (("old", 1_000_000), ("new", 2_000_000)):
        d = tmp_path / "outputs" / "2024-01-01" / name
        d.mkdir(parents=True)
        for f in ("metrics.json", "artifacts.json"):
            (d / f).write_text("{}")
            os.utime(d / f, (t, t))
    (tmp_path / "outputs" / "unfinished").mkdir()
    (tmp_path / "outputs" / "unfinished" / "metrics.json").write_text("{}")
    assert report.latest_run([tmp_path / "outputs"]) == (tmp_path / "outputs" / "2024-01-01" / "new").resolve()
    assert report.latest_run([tmp_path / "nothing"]) is None


@pytest.mark.slow
def test_notebook_runs_headless_on_the_tiny_run(tiny_run, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in cells), "commit the notebook without outputs"
    monkeypatch.setenv("SSL_PIPELINE_RUN_DIR", str(tiny_run["run_dir"]))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    images = sum("image/png" in o.get("data", {}) for c in cells for o in c.outputs)
    assert images >= 4
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors
