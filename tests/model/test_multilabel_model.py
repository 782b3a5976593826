"""The multi-label model folder end to end on tiny mosaics: exported by the retrain, loaded without unpickling,
the same scores as the run's test scores, and ``stage=predict`` deciding at the exported thresholds."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import ssl_pipeline
from ssl_pipeline import pipeline
from ssl_pipeline.data.multilabel import multilabel_csv_table
from tests.conftest import make_config
from tests.model.test_model_export import assert_no_pickle
from tests.multilabel.test_ml_run import COLOURS, make_mosaics, tiny_ml_config


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlmodel")
    root = make_mosaics(tmp / "mosaics")
    cfg = tiny_ml_config(root, tmp)
    m = pipeline.run(cfg, tmp / "run")
    return tmp, root, cfg, m


def test_multilabel_retrain_exports_a_loadable_model(ml_run):
    tmp, root, cfg, m = ml_run
    folder = tmp / "run" / "model"
    assert_no_pickle(folder)
    doc = json.loads((folder / "model.json").read_text())
    assert doc["task"] == "multilabel" and doc["head"]["kind"] == "alignment" and doc["classes"] == list(COLOURS)
    assert len(doc["thresholds"]) == len(COLOURS) and doc["input"] == "images" and doc["input_size"] == 32
    assert doc["metrics"]["retrain/test_map"] == pytest.approx(m["retrain/test_map"])
    model = ssl_pipeline.load_model(folder)
    assert model.multilabel and model.has_pca
    # the model's probabilities on the test image files are the run's test scores (same head, same tokens)
    table = multilabel_csv_table(cfg.data)
    art = json.loads((tmp / "run" / "artifacts.json").read_text())["retrain"]
    a = np.load(f"{art}/rows_test.npy"), np.load(f"{art}/test_scores.npy")
    paths = [table.paths[r] for r in a[0]]
    P = model.predict_proba(paths, batch_size=5).numpy()
    np.testing.assert_allclose(P, a[1], atol=2e-3)
    labels = model.predict(paths)
    want = ["|".join(c for c, p, t in zip(COLOURS, row, doc["thresholds"]) if p >= t) for row in P]
    assert labels == want


def test_predict_stage_on_a_multilabel_model(ml_run):
    tmp, root, cfg, m = ml_run
    images = tmp / "predict_in"
    shutil.copytree(root / "img", images)
    (images / "corrupt.png").write_bytes(b"not a png")
    pm = pipeline.run(make_config("stage=predict", f"predict.model={tmp / 'run' / 'model'}",
                                  f"predict.images={images}", cache_dir=tmp / "cache"), tmp / "pred")
    rows = list(csv.DictReader((tmp / "pred" / "predictions.csv").open()))
    assert pm["predict/n_skipped"] == 1 and len(rows) == len(list((root / "img").iterdir()))
    assert "corrupt.png" in (tmp / "pred" / "skipped.csv").read_text()
    th = json.loads((tmp / "run" / "model" / "model.json").read_text())["thresholds"]
    for r in rows:
        p = [float(r[f"p_{c}"]) for c in COLOURS]
        assert r["label"] == "|".join(c for c, q, t in zip(COLOURS, p, th) if q >= t - 1e-6)
    model = ssl_pipeline.load_model(tmp / "run" / "model")
    P = model.predict_proba([r["path"] for r in rows[:6]]).numpy()
    np.testing.assert_allclose(P, [[float(r[f"p_{c}"]) for c in COLOURS] for r in rows[:6]], atol=1e-5)
    with pytest.raises(ssl_pipeline.errors.DataError, match="PIL images"):
        model.predict_proba([torch.zeros(3)])
