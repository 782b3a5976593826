"""The whole pipeline on tiny generated images with a tiny CLIP: runs, caches, reuses, resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_pipeline import pipeline
from ssl_pipeline.errors import ConfigError
from tests.conftest import ROOT, make_config, tiny_overrides


def run(tmp_path: Path, overrides: list[str], name: str = "run") -> dict:
    cfg = make_config(*overrides, cache_dir=tmp_path / "cache")
    return pipeline.run(cfg, tmp_path / name)


def test_full_pipeline_on_tiny_images(tmp_path, image_root):
    m = run(tmp_path, tiny_overrides(image_root))
    for k in ("encode/n_images", "cluster/n_clusters", "pseudolabel/accuracy", "pseudolabel/coverage",
              "retrain/test_accuracy", "retrain/labeled_only_test_accuracy"):
        assert k in m, k
    assert m["encode/n_images"] == 3 * 10 + 3 * 4
    assert m["pseudolabel/coverage"] == 1.0
    assert m["pseudolabel/n_unlabeled"] == 3 * 10 - 3 * 2
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == pytest.approx(m)
    lines = (tmp_path / "run" / "pseudolabels.csv").read_text().splitlines()
    assert lines[0].startswith("id,path,label,")
    assert len(lines) == 1 + m["pseudolabel/n_unlabeled"]


def test_second_run_reuses_the_cache(tmp_path, image_root, monkeypatch):
    ov = tiny_overrides(image_root)
    run(tmp_path, ov, "first")
    import ssl_pipeline.backbones as bb

    def boom(*a, **k):
        raise AssertionError("encode ran again although its artifact is cached")

    monkeypatch.setattr(bb, "load_backbone", boom)
    m = run(tmp_path, ov + ["stage=pseudolabel", "pseudolabel=prototype"], "second")
    assert "pseudolabel/accuracy" in m and "retrain/test_accuracy" not in m
    assert len(list((tmp_path / "cache" / "encode").iterdir())) == 1
    assert len(list((tmp_path / "cache" / "cluster").iterdir())) == 1


def test_force_recomputes_a_stage(tmp_path, image_root):
    ov = tiny_overrides(image_root, stage="cluster")
    run(tmp_path, ov, "a")
    enc = next((tmp_path / "cache" / "encode").iterdir())
    marker = enc / "_COMPLETE"
    before = marker.stat().st_mtime_ns
    run(tmp_path, ov + ["force=[encode]"], "b")
    assert marker.stat().st_mtime_ns != before


def test_interrupted_encode_resumes_from_finished_shards(tmp_path, image_root, monkeypatch):
    """Fail encode after the first shard; the rerun only encodes the rest and matches a clean run."""
    import ssl_pipeline.stages.encode as enc
    import ssl_pipeline.stages.predict_writer as pw  # the shard loop writes the shards

    ov = tiny_overrides(image_root, stage="encode")
    clean = run(tmp_path / "clean", ov)
    real = pw.atomic_save_npy
    calls = {"n": 0}

    def flaky(path, arr):
        if Path(path).name.startswith("emb_"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")
        return real(path, arr)

    monkeypatch.setattr(pw, "atomic_save_npy", flaky)
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # Lightning turns an interrupt into SystemExit(1)
        run(tmp_path / "killed", ov)
    monkeypatch.setattr(pw, "atomic_save_npy", real)
    partial = next((tmp_path / "killed" / "cache" / "encode").glob("*.partial"))
    assert len(list((partial / "shards").glob("rows_*.npy"))) == 1
    resumed = run(tmp_path / "killed", ov)
    assert resumed["encode/n_images"] == clean["encode/n_images"]
    a = enc.EmbeddingStore(next(p for p in (tmp_path / "clean" / "cache" / "encode").iterdir()))
    b = enc.EmbeddingStore(next(p for p in (tmp_path / "killed" / "cache" / "encode").iterdir()))
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.load(), b.load())


def test_embeddings_source_skips_encode(tmp_path, embeddings_file):
    m = run(tmp_path, ["data=embeddings", f"data.path={embeddings_file}", "pseudolabel=knn", "retrain.steps=30"])
    assert m["pseudolabel/accuracy"] > 0.9
    assert "retrain/test_accuracy" in m
    assert "encode/images_per_s" not in m


def test_unreadable_images_are_skipped_and_counted(tmp_path, image_root):
    (image_root / "train" / "red" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 20)
    (image_root / "train" / "green" / "empty.png").write_bytes(b"")
    m = run(tmp_path, tiny_overrides(image_root, stage="pseudolabel"))
    assert m["encode/n_skipped"] == 2
    skipped = (tmp_path / "run" / "skipped.csv").read_text()
    assert "corrupt.jpg" in skipped and "empty.png" in skipped


def test_bad_labeled_per_class_names_the_key(tmp_path, image_root):
    with pytest.raises(ConfigError, match="data.labeled_per_class"):
        run(tmp_path, tiny_overrides(image_root, **{"data.labeled_per_class": 100000}))


def test_cli_exits_nonzero_with_one_line_naming_the_key(tmp_path, image_root):
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *tiny_overrides(image_root),
                        "data.labeled_per_class=100000", f"hydra.run.dir={tmp_path / 'cli'}",
                        f"paths.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 2
    out = (p.stdout + p.stderr).splitlines()
    named = [x for x in out if "data.labeled_per_class" in x]
    assert len(named) == 1 and "Traceback" not in p.stdout + p.stderr  # printed once, one line
    log = (tmp_path / "cli" / "__main__.log").read_text()
    assert "Traceback" in log and "data.labeled_per_class" in log  # the full trace is in the run's log file
    assert not (tmp_path / "cache" / "encode").exists(), "expensive work started before the config was checked"


def test_every_stage_has_the_same_contract():
    from ssl_pipeline.stages.base import Stage

    assert pipeline.STAGES == ["encode", "adapt", "cluster", "pseudolabel", "retrain", "report"]
    for stage in pipeline.REGISTRY:
        assert isinstance(stage, Stage) and callable(stage.key) and callable(stage.run)
