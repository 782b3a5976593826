"""The ``loss=unidec`` / ``loss=psl`` model folder: exported by the multi-label retrain, loaded without unpickling,
the run's test scores back from the loaded model (embeddings and image files), ``stage=predict`` on images."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import ssl_pipeline
from ssl_pipeline import pipeline
from ssl_pipeline.data.multilabel import multilabel_csv_table
from ssl_pipeline.errors import DataError
from ssl_pipeline.multilabel.settings import macro_map
from tests.conftest import make_config
from tests.model.test_model_export import assert_no_pickle
from tests.multilabel.test_ml_embeddings import FAST, ml_embeddings
from tests.multilabel.test_ml_run import COLOURS, make_mosaics, tiny_ml_config


def _test_scores(run_dir, which: str = "test_scores_dual_encoder"):
    art = json.loads((run_dir / "artifacts.json").read_text())["retrain"]
    return np.load(f"{art}/rows_test.npy"), np.load(f"{art}/{which}.npy")


def test_unidec_on_embeddings_exports_a_model_with_the_runs_scores(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz")
    m = pipeline.run(make_config("data=embeddings", f"data.path={f}", *FAST, "loss=unidec", "++loss.steps=60",
                                 "++loss.refresh_every=20", cache_dir=tmp_path / "cache"), tmp_path / "run")
    folder = tmp_path / "run" / "model"
    assert_no_pickle(folder)
    doc = json.loads((folder / "model.json").read_text())
    assert doc["task"] == "multilabel" and doc["input"] == "embeddings" and doc["head"]["kind"] == "dual_encoder"
    assert doc["head"]["loss"] == "unidec" and doc["head"]["use_clf"] and len(doc["thresholds"]) == 6
    assert doc["metrics"]["retrain/test_map"] == pytest.approx(m["retrain/test_map"])
    a, b = doc["head"]["platt"]
    assert a > 0  # a higher score means a likelier label
    # the scale is fitted on the validation folds' held-out rows, and the exported one is the student's
    assert m["retrain/platt_source"] == "held-out folds"
    assert [a, b] == pytest.approx([m["retrain/platt_a"], m["retrain/platt_b"]], abs=1e-4)
    model = ssl_pipeline.load_model(folder)
    rows, S = _test_scores(tmp_path / "run")
    X = torch.from_numpy(np.load(f)["X"][rows])
    np.testing.assert_allclose(model.scores(X).detach().numpy(), S, rtol=1e-4, atol=1e-3)
    P = model.predict_proba(X).numpy()
    assert P.shape == S.shape and (0 <= P).all() and (P <= 1).all()
    # the final scores: the retrain's student over the dual encoder's Platt-scaled probabilities
    np.testing.assert_allclose(P, _test_scores(tmp_path / "run", "test_scores")[1], atol=1e-4)
    Y = np.load(f)["Y"][rows]
    assert macro_map(Y, P) == pytest.approx(m["retrain/test_map"], abs=1e-4)
    assert m["retrain/dual_encoder_test_map"] == pytest.approx(macro_map(Y, S), abs=1e-6)
    assert "val/student_map" in m and m["retrain/student"]
    labels = model.predict(X)
    assert labels == ["|".join(c for c, p, t in zip(doc["classes"], r, doc["thresholds"]) if p >= t) for r in P]
    with pytest.raises(DataError, match="precomputed embeddings"):
        model.predict_proba(torch.zeros(2, 3, 8, 8))


def test_psl_on_images_exports_a_model_that_predicts_image_files(tmp_path):
    root = make_mosaics(tmp_path / "mosaics")
    cfg = tiny_ml_config(root, tmp_path, "loss=psl", "++loss.steps=40", "++loss.refresh_every=20")
    m = pipeline.run(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "model"
    assert_no_pickle(folder)
    doc = json.loads((folder / "model.json").read_text())
    assert doc["head"]["kind"] == "dual_encoder" and doc["head"]["loss"] == "psl" and not doc["head"]["use_clf"]
    assert doc["input"] == "images" and doc["classes"] == list(COLOURS)
    model = ssl_pipeline.load_model(folder)
    table = multilabel_csv_table(cfg.data)
    rows, S = _test_scores(tmp_path / "run")
    paths = [table.paths[r] for r in rows]
    Sm = model.scores(model.to_batch(paths)).detach().numpy()
    np.testing.assert_allclose(Sm, S, atol=0.05)  # float16 pooled embeddings, as the encode cache stores them
    P = model.predict_proba(paths, batch_size=4).numpy()
    assert macro_map(np.asarray(table.y_true)[rows], P) == pytest.approx(m["retrain/test_map"], abs=0.02)
    pm = pipeline.run(make_config("stage=predict", f"predict.model={folder}", f"predict.images={root / 'img'}",
                                  cache_dir=tmp_path / "cache"), tmp_path / "pred")
    out = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert pm["predict/n_skipped"] == 0 and len(out) == len(list((root / "img").iterdir()))
    for r in out[:10]:
        p = [float(r[f"p_{c}"]) for c in COLOURS]
        assert r["label"] == "|".join(c for c, q, t in zip(COLOURS, p, doc["thresholds"]) if q >= t - 1e-6)


def test_a_damaged_dual_encoder_folder_is_refused_in_one_line(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz")
    pipeline.run(make_config("data=embeddings", f"data.path={f}", *FAST, "loss=psl", "++loss.steps=20",
                             cache_dir=tmp_path / "cache"), tmp_path / "run")
    folder = tmp_path / "run" / "model"
    doc = json.loads((folder / "model.json").read_text())
    del doc["head"]["platt"]
    (folder / "model.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="dual_encoder head field 'platt' missing") as e:
        ssl_pipeline.load_model(folder)
    assert "\n" not in str(e.value)


def test_platt_scale_comes_from_held_out_rows_not_memorised_ones():
    """A model that memorised its training rows scores them far apart; held out, its scores overlap. The scale
    fitted on held-out rows is the flatter, honest one; without folds the training rows are the named fallback."""
    from ssl_pipeline.model.dual_encoder import platt_fit
    from ssl_pipeline.multilabel.recipe import dual_encoder_platt

    rng = np.random.default_rng(0)
    n, C = 200, 5
    Y = (rng.random((n, C)) < 0.3).astype(np.int8)
    S_train = np.where(Y == 1, 3.0, -3.0) + 0.1 * rng.standard_normal((n, C))  # memorised: nearly separable
    held = [np.arange(0, 100), np.arange(100, 200)]
    folds = [(h, np.where(Y == 1, 0.5, -0.5) + rng.standard_normal((n, C))) for h in held]
    (a, b), src = dual_encoder_platt(folds, Y, S_train, np.arange(n))
    assert src == "held-out folds"
    S_held = np.concatenate([Sf[h] for h, Sf in folds])
    assert (a, b) == pytest.approx(platt_fit(S_held, Y[np.concatenate(held)]))
    (a0, _), src0 = dual_encoder_platt([], Y, S_train, np.arange(n))
    assert src0 == "training rows" and a0 > 2 * a  # the memorised scale is the steeper, overconfident one
