"""stage=predict: an exported model over a folder of images -> predictions.csv / skipped.csv."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ssl_pipeline
from ssl_pipeline import pipeline
from ssl_pipeline.errors import ConfigError
from tests.conftest import ROOT, make_config, make_image_folder, tiny_overrides


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    root = make_image_folder(tmp / "images")
    m = pipeline.run(make_config(*tiny_overrides(root), "retrain.steps=60", cache_dir=tmp / "cache"), tmp / "run")
    return tmp, root, m


def predict(tmp: Path, model: Path, images: Path, *extra: str, name: str = "pred") -> dict:
    cfg = make_config("stage=predict", f"predict.model={model}", f"predict.images={images}", *extra)
    return pipeline.run(cfg, tmp / name)


def read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_matches_the_run_and_skips_a_corrupt_file(trained, tmp_path):
    tmp, root, m = trained
    images = tmp_path / "in"
    shutil.copytree(root / "test", images)
    (images / "red" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("not an image")
    nested = images / "green" / "deeper"
    nested.mkdir()
    shutil.copy(images / "green" / "000.png", nested / "copy.png")
    out = predict(tmp_path, tmp / "run" / "model", images, "predict.batch_size=5")
    rows = read(tmp_path / "pred" / "predictions.csv")
    assert list(rows[0]) == ["path", "label", "confidence", "p_blue", "p_green", "p_red"]
    names = [Path(r["path"]).name for r in rows]
    assert "corrupt.jpg" not in names and "notes.txt" not in names and "copy.png" in names
    assert len(rows) == 3 * 4 + 1 == out["predict/n_images"]
    skipped = read(tmp_path / "pred" / "skipped.csv")
    assert [Path(r["path"]).name for r in skipped] == ["corrupt.jpg"] and skipped[0]["reason"]
    assert out["predict/n_skipped"] == 1
    # the same labels and probabilities as the loaded model, and the run's test accuracy on its test images
    model = ssl_pipeline.load_model(tmp / "run" / "model")
    paths = [r["path"] for r in rows]
    P = model.predict_proba(paths)
    assert [r["label"] for r in rows] == model.predict(paths)
    for r, p in zip(rows, P.tolist()):
        assert [float(r[f"p_{c}"]) for c in model.classes] == pytest.approx(p, abs=1e-5)
        assert float(r["confidence"]) == pytest.approx(max(p), abs=1e-5)
    test_rows = [r for r in rows if Path(r["path"]).parent.parent == images]
    acc = sum(r["label"] == Path(r["path"]).parent.name for r in test_rows) / len(test_rows)
    assert acc == pytest.approx(m["retrain/test_accuracy"])


@pytest.mark.parametrize("key,value,match", [
    ("predict.model", "/nonexistent/model", "does not exist"),
    ("predict.images", "/nonexistent/images", "does not exist"),
    ("predict.batch_size", "0", "must be >= 1"),
])
def test_bad_settings_name_the_key(trained, tmp_path, key, value, match):
    tmp, root, _ = trained
    ov = {"predict.model": tmp / "run" / "model", "predict.images": root / "test", key: value}
    cfg = make_config("stage=predict", *[f"{k}={v}" for k, v in ov.items()])
    with pytest.raises(ConfigError, match=f"{key}: .*{match}"):
        pipeline.run(cfg, tmp_path / "pred")


def test_missing_model_and_empty_folder(trained, tmp_path):
    tmp, root, _ = trained
    with pytest.raises(ConfigError, match="predict.model: set predict.model"):
        pipeline.run(make_config("stage=predict", f"predict.images={root}"), tmp_path / "a")
    with pytest.raises(ConfigError, match="predict.model: .*no model.json"):
        predict(tmp_path, root, root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="predict.images: no image files"):
        predict(tmp_path, tmp / "run" / "model", tmp_path / "empty")


def test_cli_bad_model_exits_2_with_one_line(trained, tmp_path):
    _, root, _ = trained
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", "stage=predict", f"predict.model={tmp_path / 'nope'}",
                        f"predict.images={root / 'test'}", f"hydra.run.dir={tmp_path / 'cli'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2
    assert "predict.model" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
def test_ddp_two_cpu_processes_give_the_same_predictions(trained, tmp_path):
    tmp, root, _ = trained
    pipeline.run(make_config("stage=predict", f"predict.model={tmp / 'run' / 'model'}",
                             f"predict.images={root / 'test'}"), tmp_path / "one")
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", "stage=predict", f"predict.model={tmp / 'run' / 'model'}",
                        f"predict.images={root / 'test'}", "trainer=ddp", "trainer.accelerator=cpu",
                        "trainer.devices=2", f"hydra.run.dir={tmp_path / 'ddp'}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    one = sorted((tmp_path / "one" / "predictions.csv").read_text().splitlines())
    assert sorted((tmp_path / "ddp" / "predictions.csv").read_text().splitlines()) == one
