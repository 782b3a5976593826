"""Held-out folds of the labeled rows (ssl_pipeline.validation) and the val/* metrics they give."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_pipeline import pipeline, validation
from ssl_pipeline.errors import ConfigError
from tests.conftest import make_config


def s(**kw) -> dict:
    return dict(validation.DEFAULTS, **kw)


def test_kfold_holds_out_every_label_once_except_singletons():
    y = np.full(100, -1)
    y[:4], y[10:13], y[20] = 0, 1, 2  # class 2 has a single label
    folds = validation.single_label_folds(y, s(folds=3))
    held = np.concatenate(folds)
    assert len(folds) == 3 and len(held) == len(np.unique(held))
    assert set(held) == set(range(4)) | set(range(10, 13))  # every label of classes 0 and 1, never class 2's
    for f in folds:  # each fit keeps at least one label of every class
        y_f = y.copy()
        y_f[f] = -1
        assert set(y_f[y_f >= 0]) == {0, 1, 2}
    assert [a.tolist() for a in validation.single_label_folds(y, s(folds=3))] == [a.tolist() for a in folds]
    other = validation.single_label_folds(y, s(folds=3, seed=1))
    assert sorted(np.concatenate(other)) == sorted(held)


def test_many_labels_give_one_stratified_split():
    y = np.repeat(np.arange(4), 300)
    folds = validation.single_label_folds(y, s(kfold_below=500, fraction=0.2))
    assert len(folds) == 1
    assert np.bincount(y[folds[0]]).tolist() == [60, 60, 60, 60]
    assert validation.single_label_folds(y, s(folds=0)) == []


def test_multilabel_folds_keep_a_positive_of_every_label():
    rng = np.random.default_rng(0)
    Y = (rng.random((40, 5)) < 0.3).astype(np.int8)
    Y[0, 4], Y[1:, 4] = 1, 0  # label 4: a single labeled positive, which is never held out
    labeled = np.ones(40, bool)
    (fold,) = validation.multilabel_folds(Y, labeled, s(multilabel_folds=1, fraction=0.25))
    assert 0 not in fold and len(fold) == 10
    keep = np.setdiff1d(np.arange(40), fold)
    assert (Y[keep].sum(0) >= 1).all()


def test_bad_settings_name_their_key():
    with pytest.raises(ConfigError, match="val.fraction"):
        validation.settings(make_config("val.fraction=1.5"))
    with pytest.raises(ConfigError, match="val.folds"):
        validation.settings(make_config("val.folds=1"))
    with pytest.raises(ConfigError, match="val.nope"):
        validation.settings(make_config("++val.nope=3"))


def test_pseudolabel_run_reports_val_accuracy_and_keeps_every_label(tmp_path, embeddings_file):
    cfg = make_config("data=embeddings", f"data.path={embeddings_file}", "pseudolabel=knn", "stage=pseudolabel",
                      cache_dir=tmp_path / "cache")
    m = pipeline.run(cfg, tmp_path / "run")
    assert not [k for k in m if k.startswith("retrain/")]
    assert 0.0 <= m["val/accuracy"] <= 1.0 and m["val/n_heldout"] >= 1
    n_labeled = m["pseudolabel/n_labeled"]
    pl = Path(json.loads((tmp_path / "run" / "artifacts.json").read_text())["pseudolabel"])
    assert int(np.load(pl / "labeled.npy").sum()) == n_labeled  # the main fit saw every label
    fold = pl / "val" / "fold0"
    held = np.load(fold / "heldout_rows.npy")
    assert len(held) and not np.isin(held, np.load(fold / "rows.npy")).any()
    assert int(np.load(fold / "labeled.npy").sum()) == n_labeled - len(held)
    assert pipeline.objective(cfg, m) == m["val/accuracy"]
    off = make_config("data=embeddings", f"data.path={embeddings_file}", "pseudolabel=knn", "stage=pseudolabel",
                      "val.folds=0", cache_dir=tmp_path / "cache")
    assert "val/accuracy" not in pipeline.run(off, tmp_path / "run_off")


def test_validation_sample_bounds_the_fits_at_scale():
    from ssl_pipeline.labeling.knn import knn_graph
    from ssl_pipeline.stages.pseudolabel import validation_sample
    from tests.conftest import blobs

    X, y = blobs(n_per_class=50)
    g = knn_graph(X, 8)
    rows = np.arange(100, 100 + len(X))
    same = validation_sample(X, y, rows, g, 0, 0)
    assert same[0] is X and same[3] is g
    Xs, ys, rs, gs = validation_sample(X, y, rows, g, 120, 0)
    assert Xs.shape == (120, X.shape[1]) and len(ys) == len(rs) == 120 and gs.idx.shape == (120, 8)
    assert np.isin(rs, rows).all() and (np.diff(rs) > 0).all()
    assert (gs.idx < 120).all() and (gs.idx != np.arange(120)[:, None]).all()


def test_a_sampled_validation_fits_once(tmp_path):
    from ssl_pipeline.labeling.knn import knn_graph
    from ssl_pipeline.stages.pseudolabel import validate_labeler
    from tests.conftest import blobs

    X, y_true = blobs(n_per_class=60)
    y = np.full(len(y_true), -1)
    y[::6] = y_true[::6]  # 40 labels: 5-fold without sampling, one split with it
    cfg = make_config("pseudolabel=knn", "val.max_rows=150")
    m = validate_labeler(cfg, X, y, np.arange(len(y)), knn_graph(X, 20), tmp_path)
    assert m["val/folds"] == 1 and m["val/n_rows"] == 150 and 0 <= m["val/accuracy"] <= 1
    full = validate_labeler(make_config("pseudolabel=knn", "val.max_rows=0"), X, y, np.arange(len(y)),
                            knn_graph(X, 20), tmp_path / "full")
    assert full["val/folds"] == 5 and full["val/n_heldout"] == 40


def test_threaded_folds_give_the_serial_figures(tmp_path):
    """val.n_jobs changes how the fold fits run, not what they give (HDL, 5 folds, 2 threads vs 1)."""
    from ssl_pipeline.labeling.knn import knn_graph
    from ssl_pipeline.stages.pseudolabel import validate_labeler
    from tests.conftest import blobs

    X, y_true = blobs(n_per_class=60)
    y = np.full(len(y_true), -1)
    y[::6] = y_true[::6]
    g = knn_graph(X, 20)
    runs = {}
    for jobs in (1, 2):
        out = tmp_path / f"j{jobs}"
        m = validate_labeler(make_config("pseudolabel=hdl", f"val.n_jobs={jobs}"), X, y, np.arange(len(y)), g, out)
        runs[jobs] = (m["val/accuracy"], m["val/folds"], np.load(out / "val" / "fold0" / "labels.npy"))
    assert runs[1][:2] == runs[2][:2] and runs[1][1] == 5
    assert np.array_equal(runs[1][2], runs[2][2])
    with pytest.raises(ConfigError, match="val.n_jobs"):
        validation.settings(make_config("val.n_jobs=0"))
