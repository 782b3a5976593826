"""``loss.unlabeled_weight`` of loss=unidec / psl: auto (chosen on held-out labeled rows), a number, bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ssl_pipeline import pipeline
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.multilabel.recipe import choose_unlabeled_weight
from ssl_pipeline.multilabel.unidec import loss_settings
from tests.conftest import ROOT, make_config
from tests.multilabel.test_ml_embeddings import FAST, ml_embeddings

QUICK = ["loss=unidec", "++loss.steps=60", "++loss.refresh_every=20"]


def test_auto_weight_is_chosen_on_the_held_out_fold_through_the_cli(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SSL_PIPELINE_CACHE=str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "ssl_pipeline", "stage=retrain", "data=embeddings", f"data.path={f}",
           f"hydra.run.dir={run_dir}", *FAST, *QUICK, "++loss.unlabeled_weight_grid=[0,1]"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["retrain/unlabeled_weight_source"] == "auto" and m["retrain/unlabeled_weight"] in (0.0, 1.0)
    fold = {w: m[f"val/map@unlabeled_weight={w}"] for w in ("0", "1")}
    best = max(fold.values())
    assert m["val/retrain_map"] == best and fold[f"{m['retrain/unlabeled_weight']:g}"] == best
    for k in ("val/retrain_p@1", "val/retrain_p@5", "val/unlabeled_weight_seconds", "retrain/test_p@5"):
        assert k in m, k
    if m["retrain/unlabeled_weight"] == 0:  # weight 0: the semi-supervised dual encoder is the labeled-only twin
        assert m["retrain/dual_encoder_test_map"] == m["retrain/labeled_only_test_map"]
    assert "val/student_map" in m and m["retrain/student"]  # the student over it, chosen on the same folds


def _fold_file(tmp_path, Y_unl_pseudo: np.ndarray, held: np.ndarray):
    n_u, C = Y_unl_pseudo.shape
    np.savez(tmp_path / "val_teacher.npz", rows=held, teacher=np.zeros((len(held), C)), pseudo=np.zeros((len(held), C)),
             fold_sizes=np.array([len(held)]), unl_decision=Y_unl_pseudo[None].astype(bool),
             unl_counted=np.ones((1, n_u, C), bool))
    return tmp_path


@pytest.mark.parametrize("pseudo, expect", [("copies", 1.0), ("random", 0.0)])
def test_auto_weight_follows_the_evidence(tmp_path, pseudo, expect):
    """Pseudo-labeled rows that are copies of the held-out rows with their true labels are used; random
    pseudo-labels are not."""
    rng = np.random.default_rng(0)
    C, D, n = 12, 32, 300
    centres = rng.normal(size=(C, D))
    Y = np.zeros((n, C), np.int8)
    for i in range(n):
        Y[i, rng.choice(C, 2, replace=False)] = 1
    X = Y @ centres + 0.8 * rng.normal(size=(n, D))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    labeled = np.zeros(n, bool)
    labeled[:60] = True
    held = np.arange(30, 60)
    X[60:90], Y[60:90] = X[held], Y[held]
    Yu = Y[~labeled] if pseudo == "copies" else (rng.random((n - 60, C)) < 2 / C).astype(np.int8)
    name, kwargs, s = loss_settings(make_config("data=embeddings", "loss=unidec", "++loss.steps=150",
                                                "++loss.unlabeled_weight_grid=[0,1]"))
    w, source, m = choose_unlabeled_weight(_fold_file(tmp_path, Yu, held), X, Y, labeled, None, name, kwargs, s, 0)
    assert (w, source) == (expect, "auto"), m
    assert m["val/retrain_map"] == max(m["val/map@unlabeled_weight=0"], m["val/map@unlabeled_weight=1"])


def test_fixed_weight_and_no_fold(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz")
    m = pipeline.run(make_config("data=embeddings", f"data.path={f}", *FAST, *QUICK, "loss.unlabeled_weight=0.5",
                                 cache_dir=tmp_path / "cache"), tmp_path / "run")
    assert (m["retrain/unlabeled_weight"], m["retrain/unlabeled_weight_source"]) == (0.5, "fixed")
    # the fixed weight's fold models are the evidence the student is chosen on: one weight, no choice of it
    assert [k for k in m if k.startswith("val/map@")] == ["val/map@unlabeled_weight=0.5"] and "val/student_map" in m
    m = pipeline.run(make_config("data=embeddings", f"data.path={f}", *FAST, *QUICK, "val.folds=0",
                                 cache_dir=tmp_path / "cache"), tmp_path / "run0")
    assert (m["retrain/unlabeled_weight"], m["retrain/unlabeled_weight_source"]) == (0.0, "auto: no held-out fold")
    # no fold: no student either; the model is the labeled-only dual encoder, its scores Platt-scaled
    assert m["retrain/student"] == "lam0_w1_a0" and "val/student_map" not in m
    assert m["retrain/dual_encoder_test_map"] == m["retrain/labeled_only_test_map"]
    assert m["retrain/test_map"] == pytest.approx(m["retrain/labeled_only_test_map"], abs=2e-3)


@pytest.mark.parametrize("over, key", [
    ("loss.unlabeled_weight=-1", "loss.unlabeled_weight"),
    ("loss.unlabeled_weight=often", "loss.unlabeled_weight"),
    ("loss.unlabeled_weight=true", "loss.unlabeled_weight"),
    ("loss.unlabeled_weight_grid=[]", "loss.unlabeled_weight_grid"),
    ("loss.unlabeled_weight_grid=[0,-2]", "loss.unlabeled_weight_grid"),
    ("loss.unlabeled_weight_grid=0.5", "loss.unlabeled_weight_grid"),
])
def test_bad_unlabeled_weight_is_refused_naming_the_key(over, key):
    with pytest.raises(ConfigError) as e:
        loss_settings(make_config("data=embeddings", "loss=unidec", over))
    assert key in str(e.value) and "\n" not in str(e.value)
