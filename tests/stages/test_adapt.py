"""adapt=simcse_pp: the SimCSE++ projection runs end to end, is cached, and the labelers see its space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import blobs, make_config

REPO = Path(__file__).resolve().parents[2]
FAST = ["adapt.epochs=3", "adapt.batch_size=64", "adapt.hidden=32", "val.folds=0"]


def _run(tmp_path: Path, *ov: str, run: str = "run") -> dict:
    from ssl_pipeline import pipeline

    cfg = make_config("data=embeddings", *ov, cache_dir=tmp_path / "cache")
    return pipeline.run(cfg, tmp_path / run)


def _arts(tmp_path: Path, run: str = "run") -> dict:
    return json.loads((tmp_path / run / "artifacts.json").read_text())


def test_adapter_starts_as_identity_trains_and_is_seeded():
    from ssl_pipeline.adapt import ResidualProjection, SimCSEPPAdapter

    X, _ = blobs(n_per_class=40, dim=16)
    import torch

    proj = ResidualProjection(16, hidden=8).eval()
    assert np.allclose(proj(torch.from_numpy(X)).detach().numpy(), X, atol=1e-6)  # zero-initialised branch
    a = SimCSEPPAdapter(hidden=32, epochs=15, batch_size=64, lr=3e-3, seed=0).fit(X)
    Z = a.transform(X)
    assert Z.shape == X.shape and np.allclose(np.linalg.norm(Z, axis=1), 1, atol=1e-5)
    assert a.history_[-1]["loss"] < a.history_[0]["loss"] and not np.allclose(Z, X, atol=1e-3)
    assert np.array_equal(Z, SimCSEPPAdapter(hidden=32, epochs=15, batch_size=64, lr=3e-3, seed=0).fit_transform(X))
    with pytest.raises(ValueError, match="dropout must be > 0"):
        SimCSEPPAdapter(dropout=0.0).fit(X)


def test_adapt_simcse_pp_is_cached_and_the_labelers_see_the_adapted_space(tmp_path, embeddings_file):
    ov = [f"data.path={embeddings_file}", "adapt=simcse_pp", *FAST, "stage=pseudolabel"]
    m = _run(tmp_path, *ov)
    arts = _arts(tmp_path)
    assert "adapt" in arts and m["adapt/loss_last"] < m["adapt/loss_first"] and m["pseudolabel/accuracy"] > 0.5
    adapted = np.load(Path(arts["adapt"]) / "shards" / "emb_00000.npy").astype(np.float32)
    raw = np.load(embeddings_file)["X"].astype(np.float32)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    # the cluster graph's similarities are those of the adapted rows, not the raw ones
    cl = Path(arts["cluster"])
    rows, idx, sim = (np.load(cl / f"{n}.npy") for n in ("rows", "knn_idx", "knn_sim"))
    store_rows = np.load(Path(arts["adapt"]) / "shards" / "rows_00000.npy")
    A = adapted[np.searchsorted(store_rows, rows)]
    R = raw[rows]
    assert np.allclose(sim[:, 0], (A * A[idx[:, 0]]).sum(1), atol=2e-3)
    assert not np.allclose(sim[:, 0], (R * R[idx[:, 0]]).sum(1), atol=2e-3)
    # a second run reuses every stage; force=[adapt] refits the projection (same seed: same rows) and the
    # downstream keys stay those of the adapted space
    _run(tmp_path, *ov, run="run2")
    assert _arts(tmp_path, "run2") == arts
    _run(tmp_path, *ov, "force=[adapt]", run="run3")
    assert _arts(tmp_path, "run3") == arts
    # the default (adapt=none) runs no adapt stage and keys the cluster on the encode stage: another graph
    _run(tmp_path, f"data.path={embeddings_file}", "stage=pseudolabel", run="plain")
    plain = _arts(tmp_path, "plain")
    assert "adapt" not in plain and plain["encode"] == arts["encode"] and plain["cluster"] != arts["cluster"]
    assert not np.allclose(np.load(Path(plain["cluster"]) / "knn_sim.npy")[:, 0], sim[:, 0], atol=2e-3)
    # another adapter setting is another artifact
    _run(tmp_path, *ov, "adapt.seed=1", run="seed1")
    assert _arts(tmp_path, "seed1")["adapt"] != arts["adapt"]


def test_loss_simcse_pp_is_refused_in_retrain_and_points_to_adapt(tmp_path, embeddings_file):
    from ssl_pipeline import pipeline
    from ssl_pipeline.errors import ConfigError

    cfg = make_config("data=embeddings", f"data.path={embeddings_file}", "loss=simcse_pp",
                      cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg, tmp_path / "run")
    assert e.value.key == "loss" and "adapt=simcse_pp" in str(e.value)


def test_adapt_refuses_multilabel_data_with_one_line(tmp_path):
    from ssl_pipeline import pipeline
    from ssl_pipeline.errors import ConfigError

    cfg = make_config("data=multilabel_demo", "data.n_images=40", "adapt=simcse_pp", "stage=cluster",
                      cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError) as e:
        pipeline.run(cfg, tmp_path / "run")
    assert e.value.key == "adapt" and "\n" not in str(e.value)


def test_cli_pseudolabel_with_adapt_simcse_pp(tmp_path, embeddings_file):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SSL_PIPELINE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ssl_pipeline", "stage=pseudolabel", "data=embeddings",
           f"data.path={embeddings_file}", "adapt=simcse_pp", *FAST, f"hydra.run.dir={tmp_path / 'cli'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert m["adapt/n_fit_rows"] > 0 and "pseudolabel/accuracy" in m
    assert (tmp_path / "cache" / "adapt").is_dir()
