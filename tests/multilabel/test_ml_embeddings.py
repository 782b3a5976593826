"""Multi-label embedding files through the CLI: the default recipe, loss=unidec / psl, and bad arrays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ssl_pipeline import pipeline
from ssl_pipeline.errors import ConfigError, DataError
from tests.conftest import ROOT, make_config


def ml_embeddings(path: Path, n: int = 160, C: int = 6, D: int = 24, seed: int = 0, with_text: bool = False, **over):
    """Embedding mosaics in miniature: each row is the normalised mean of 1-3 class directions plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, D))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    Y = np.zeros((n, C), np.int8)
    for i in range(n):
        Y[i, rng.choice(C, rng.integers(1, 4), replace=False)] = 1
    X = Y @ centres + 0.3 * rng.normal(size=(n, D))
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    split = np.where(np.arange(n) % 4 == 3, "test", "train")
    labeled = (split == "train") & (rng.random(n) < 0.3)
    for c in range(C):  # every label gets a labeled positive
        if not (labeled & (Y[:, c] == 1)).any():
            labeled[np.flatnonzero((split == "train") & (Y[:, c] == 1))[0]] = True
    arrays = {"X": X, "Y": Y, "labeled": labeled, "split": split, "classes": np.array([f"c{c}" for c in range(C)])}
    if with_text:
        arrays["text"] = (centres + 0.1 * rng.normal(size=centres.shape)).astype(np.float32)
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


FAST = ["++multilabel.steps=40", "++multilabel.warmup_steps=10", "++multilabel.refresh_every=10",
        "++multilabel.pseudo.knn_k=5", "++multilabel.token_dim=8", "cluster.n_clusters=3"]


def test_default_recipe_and_unidec_through_the_cli(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SSL_PIPELINE_CACHE=str(tmp_path / "cache"))
    for extra in ([], ["loss=unidec", "++loss.steps=60", "++loss.refresh_every=20"]):
        run_dir = tmp_path / ("run_" + ("unidec" if extra else "default"))
        cmd = [sys.executable, "-m", "ssl_pipeline", "stage=retrain", "data=embeddings", f"data.path={f}",
               f"hydra.run.dir={run_dir}", *FAST, *extra]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        m = json.loads((run_dir / "metrics.json").read_text())
        for k in ("retrain/test_map", "retrain/labeled_only_test_map", "retrain/test_p@1", "retrain/test_p@5",
                  "pseudolabel/map", "val/map"):
            assert k in m, (extra, k)
        assert m["retrain/n_test"] == 40
        assert m["retrain/test_map"] > 0.6, m["retrain/test_map"]  # chance is about 1/3
        if extra:
            assert m["retrain/loss"] == "unidec" and m["retrain/n_refreshes"] >= 3
            assert 0 <= m["retrain/hard_negative_hit_rate"] <= 1
            assert m["retrain/unlabeled_weight_source"] == "auto" and m["retrain/unlabeled_weight"] in (0, 0.25, 1)


def test_psl_and_text_init(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz", with_text=True)
    m = pipeline.run(make_config("data=embeddings", f"data.path={f}", *FAST, "loss=psl", "++loss.steps=60",
                                 cache_dir=tmp_path / "cache"), tmp_path / "run")
    assert m["retrain/loss"] == "psl" and m["retrain/label_init"] == "text"
    assert m["retrain/test_map"] > 0.6


@pytest.mark.parametrize("over, msg", [
    ({"Y": np.zeros((5, 2))}, "Y must be an N x C array"),
    ({"Y": np.full((160, 6), 2)}, "Y must hold only 0/1 values; row 0"),
    ({"labeled": np.ones(10, bool)}, "labeled must have shape (160,)"),
    ({"labeled": None}, "missing array 'labeled'"),
    ({"labeled": np.zeros(160, bool)}, "labeled has no True row"),
    ({"split": np.full(160, "val")}, "split holds values ['val']"),
    ({"text": np.ones((6, 3), np.float32)}, "text must be a numeric C x D = 6 x 24"),
    ({"classes": np.array(["a", "b"])}, "classes must have 6 names"),
    ({"y": np.zeros(160, np.int64)}, "holds both y (single-label) and Y"),
])
def test_bad_multilabel_arrays_get_one_line_errors(tmp_path, over, msg):
    f = ml_embeddings(tmp_path / "bad.npz", **over)
    with pytest.raises(DataError) as e:
        pipeline.run(make_config("data=embeddings", f"data.path={f}", cache_dir=tmp_path / "cache"), tmp_path / "r")
    assert msg in str(e.value) and "bad.npz" in str(e.value) and "\n" not in str(e.value)


def test_bad_arrays_through_the_cli_print_one_line(tmp_path):
    f = ml_embeddings(tmp_path / "bad.npz", Y=np.full((160, 6), 3))
    env = dict(os.environ, PYTHONPATH=str(ROOT), SSL_PIPELINE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "ssl_pipeline", "data=embeddings", f"data.path={f}",
                        f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "Y must hold only 0/1 values" in r.stderr and "Traceback" not in r.stderr


def test_label_without_a_labeled_positive_is_refused(tmp_path):
    f = ml_embeddings(tmp_path / "ml.npz")
    z = dict(np.load(f))
    z["labeled"] = z["labeled"] & (z["Y"][:, 0] == 0)
    np.savez(f, **z)
    with pytest.raises(DataError, match=r"labels \['c0'\].*no labeled positive"):
        pipeline.run(make_config("data=embeddings", f"data.path={f}", cache_dir=tmp_path / "cache"), tmp_path / "r")


def test_unidec_and_psl_refused_on_single_label_data(tmp_path):
    rng = np.random.default_rng(0)
    f = tmp_path / "sl.npz"
    np.savez(f, X=rng.normal(size=(30, 8)).astype(np.float32), y=np.r_[np.arange(3), -np.ones(27, int)])
    for loss in ("unidec", "psl"):
        with pytest.raises(ConfigError, match=f"loss={loss} runs on multi-label data only"):
            pipeline.run(make_config("data=embeddings", f"data.path={f}", f"loss={loss}",
                                     cache_dir=tmp_path / "cache"), tmp_path / "r")
    f2 = ml_embeddings(tmp_path / "ml.npz")
    with pytest.raises(ConfigError, match="loss=samtone does not apply to multi-label data"):
        pipeline.run(make_config("data=embeddings", f"data.path={f2}", "loss=samtone", cache_dir=tmp_path / "c"),
                     tmp_path / "r2")
