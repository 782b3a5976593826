"""HDL's text expert (class-name embeddings as a zero-shot prior), its temperature, and calibration error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssl_pipeline.errors import DataError
from ssl_pipeline.labeling.calibration import expected_calibration_error
from ssl_pipeline.labeling.hdl import HDL
from ssl_pipeline.labeling.text import fit_temperature, text_posterior
from tests.labeling.test_hdl import blobs, mask_labels

TEXT_CIFAR = Path(__file__).resolve().parents[3] / "shared" / "data" / "clip_vitb32" / "text" / "cifar10_test500.npz"


def test_ece_is_small_when_confidence_matches_accuracy_and_large_when_overconfident():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 1.0, 20000)
    right = rng.random(20000) < conf  # right with probability = confidence
    assert expected_calibration_error(conf, right) < 0.02
    assert expected_calibration_error(np.full(1000, 0.95), np.arange(1000) < 600) == pytest.approx(0.35, abs=1e-6)
    with pytest.raises(ValueError, match="rows"):
        expected_calibration_error(conf, right[:10])


def test_temperature_is_recovered_from_labeled_rows_whatever_the_scale():
    rng = np.random.default_rng(1)
    S = rng.uniform(0.15, 0.35, (3000, 10)).astype(np.float32)  # CLIP-like cosine range
    for beta in (30.0, 120.0):
        P = np.exp(beta * S)
        P /= P.sum(axis=1, keepdims=True)
        y = np.array([rng.choice(10, p=p) for p in P])
        est = fit_temperature(S, np.arange(3000), y)
        assert 0.85 * beta < est < 1.15 * beta, (beta, est)
    # no labeled row: a finite temperature from the entropy of the pool's posterior
    assert 1.0 < fit_temperature(S, np.array([], np.int64), np.array([], np.int64)) < 1000.0


def _text_blobs(seed=0):
    X, y, centres = blobs([80] * 8, d=32, sigma=2.5, seed=seed)
    rng = np.random.default_rng(seed + 1)
    text = centres + 1.0 * rng.standard_normal(centres.shape) / np.sqrt(32)  # a noisy "class name" per class
    return X, y, (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)


def test_text_expert_lifts_one_label_per_class_above_both_sources():
    X, y, text = _text_blobs()
    ym = mask_labels(y, 1, seed=0)
    u = ym < 0
    zero_shot = (np.argmax(X @ text.T, axis=1)[u] == y[u]).mean()
    img = (HDL().fit(X, ym).labels_[u] == y[u]).mean()
    hdl = HDL().fit(X, ym, text=text)
    both = (hdl.labels_[u] == y[u]).mean()
    assert both > max(zero_shot, img), (both, zero_shot, img)
    assert hdl.text_beta_ > 0 and HDL().fit(X, ym).text_beta_ is None


def test_text_rows_follow_class_order_and_bad_text_is_a_clear_error():
    X, y, text = _text_blobs(seed=3)
    ym = mask_labels(y, 2, seed=1)
    with pytest.raises(ValueError, match="text must be"):
        HDL().fit(X, ym, text=text[:, :10])
    with pytest.raises(ValueError, match="class order"):
        HDL().fit(X, ym, text=text[:5])
    # shuffled text rows (wrong class order) are worse than the right order
    u = ym < 0
    right = (HDL().fit(X, ym, text=text).labels_[u] == y[u]).mean()
    wrong = (HDL().fit(X, ym, text=np.roll(text, 1, axis=0)).labels_[u] == y[u]).mean()
    assert right > wrong


def test_text_posterior_scale_free():
    X, y, text = _text_blobs(seed=5)
    lab = np.flatnonzero(mask_labels(y, 2) >= 0)
    P, beta = text_posterior(X, text, lab, y[lab])
    assert P.shape == (len(X), 8) and np.allclose(P.sum(axis=1), 1, atol=1e-5) and beta > 0


def test_embeddings_file_text_array_is_read_and_checked(tmp_path):
    from omegaconf import OmegaConf

    from ssl_pipeline.data.sources import embeddings_table, load_embeddings_file

    X, y, text = _text_blobs()
    ym = mask_labels(y, 2)
    good = tmp_path / "good.npz"
    np.savez(good, X=X, y=ym, y_true=y, text=text)
    table = embeddings_table(OmegaConf.create({"path": str(good)}))
    assert table.meta["text"].shape == (8, 32)
    bad = tmp_path / "bad.npz"
    np.savez(bad, X=X, y=ym, text=text[:3])
    with pytest.raises(DataError, match="text has 3 rows"):
        load_embeddings_file(bad)
    np.savez(bad, X=X, y=ym, text=text[:, :4])
    with pytest.raises(DataError, match="text must be"):
        load_embeddings_file(bad)


@pytest.mark.skipif(not TEXT_CIFAR.exists(), reason=f"real CLIP text embeddings not found at {TEXT_CIFAR}")
def test_real_clip_text_beats_zero_shot_at_one_label_per_class():
    z = np.load(TEXT_CIFAR)
    X = z["X"].astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    y, text = z["y"].astype(np.int64), z["text"].astype(np.float32)
    ym = mask_labels(y, 1, seed=0)
    u = ym < 0
    zero_shot = (np.argmax(X @ text.T, axis=1)[u] == y[u]).mean()  # 0.902
    hdl = HDL().fit(X, ym, text=text)
    acc = (hdl.labels_[u] == y[u]).mean()
    assert acc > zero_shot + 0.005, (acc, zero_shot)
    assert expected_calibration_error(hdl.confidence_[u], hdl.labels_[u] == y[u]) < 0.08


def test_pipeline_pseudolabel_stage_feeds_the_files_text_to_hdl(tmp_path):
    """data=embeddings with a ``text`` array: the pseudolabel stage passes it to HDL and reports ece."""
    from ssl_pipeline import pipeline
    from tests.conftest import make_config

    X, y, text = _text_blobs()
    ym = mask_labels(y, 1)
    f = tmp_path / "emb.npz"
    np.savez(f, X=X, y=ym, y_true=y, text=text)
    out = {}
    for name, path in (("text", f), ("plain", tmp_path / "plain.npz")):
        if name == "plain":
            np.savez(path, X=X, y=ym, y_true=y)
        cfg = make_config("data=embeddings", f"data.path={path}", "pseudolabel=hdl", "stage=pseudolabel",
                          cache_dir=tmp_path / "cache")
        out[name] = pipeline.run(cfg, tmp_path / name)
    assert out["text"]["pseudolabel/text"] == 1 and out["plain"]["pseudolabel/text"] == 0
    assert 0.0 <= out["text"]["pseudolabel/ece"] <= 1.0
    assert out["text"]["pseudolabel/accuracy"] > out["plain"]["pseudolabel/accuracy"]
