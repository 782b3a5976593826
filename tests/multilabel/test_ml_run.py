"""The alignment head on its own, and multi-label data through the pipeline's stages with the tiny CLIP."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_pipeline import pipeline
from ssl_pipeline.data.multilabel import multilabel_csv_table
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.multilabel import settings as mlset
from ssl_pipeline.multilabel.head import AlignmentHead, init_class_embeddings
from ssl_pipeline.multilabel.train import fit, predict
from tests.conftest import make_config

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}


def make_mosaics(root: Path, n: int = 48, seed: int = 0) -> Path:
    """2 x 2 mosaics (32 px) of coloured noisy tiles or gray; labels = colours present; 25% test via a split column."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        canvas = np.full((32, 32, 3), 128, np.float32)
        present = set()
        for t in range(4):
            if rng.random() < 0.6:
                c = names[(i + t) % 4] if t == 0 else names[rng.integers(4)]
                present.add(c)
                r, q = divmod(t, 2)
                canvas[16 * r:16 * r + 16, 16 * q:16 * q + 16] = COLOURS[c]
        if not present:
            c = names[i % 4]
            present.add(c)
            canvas[:16, :16] = COLOURS[c]
        canvas += rng.normal(0, 12, canvas.shape)
        Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).save(root / "img" / f"{i:03d}.png")
        rows.append([f"{i:03d}.png", *[int(c in present) for c in names], "test" if i % 4 == 3 else "train"])
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Filenames", *names, "split"])
        w.writerows(rows)
    return root


def synthetic_tokens(n: int, C: int = 3, P: int = 9, d: int = 16, seed: int = 0):
    """Tokens (n, P, d): label c present = one random token carries the pattern e_c; else noise only."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(C, d, generator=g) * 2.0
    Y = (torch.rand(n, C, generator=g) < 0.4).float()
    x = torch.randn(n, P, d, generator=g) * 0.5
    for i in range(n):
        for c in torch.nonzero(Y[i]).flatten():
            x[i, torch.randint(0, P, (1,), generator=g)] += pattern[c]
    return x, Y


def test_head_shapes_and_attention():
    x, Y = synthetic_tokens(10)
    e = init_class_embeddings(x.numpy(), Y.numpy())
    head = AlignmentHead(16, e, np.array([0, 0, 1]), hidden=8)
    logits, ctx = head(x)
    assert logits.shape == (10, 3) and ctx.shape == (10, 2)
    v, q, att, g = head.features(x)
    assert v.shape == (10, 3, 8) and q.shape == (3, 8) and att.shape == (10, 3, 9) and g.shape == (10, 8)
    assert torch.allclose(att.sum(-1), torch.ones(10, 3), atol=1e-5)
    keep = torch.zeros(10, 9, dtype=torch.bool)
    keep[:, 0] = True
    _, _, att, _ = head.features(x, keep)
    assert torch.allclose(att[..., 0], torch.ones(10, 3))  # dropped tokens get no attention


def test_head_learns_a_token_level_task():
    torch.manual_seed(0)  # the head's initial weights come from the global generator: one fixed draw
    x, Y = synthetic_tokens(300)
    x_tr, Y_tr = x[:200], Y[:200]
    x_te, Y_te = x[200:], Y[200:]
    e = init_class_embeddings(x_tr.numpy(), Y_tr.numpy())
    settings = dict(mlset.DEFAULTS, steps=150, warmup_steps=0, batch_labeled=32, lr=1e-2)
    module = fit(AlignmentHead(16, e, np.array([0, 1, 2]), hidden=16), x_tr, Y_tr, Y_tr, None, None, settings, 0)
    S, _ = predict(module.teacher, x_te)
    assert mlset.macro_map(Y_te.numpy().astype(int), S) > 0.9


def tiny_ml_config(root: Path, tmp: Path, *extra: str):
    return make_config(
        "backbone=tiny", "data=multilabel_csv", f"data.root={root / 'img'}", f"data.manifest={root / 'labels.csv'}",
        "data.labeled_fraction=0.3", "data.image_size=null", "encode.shard_size=16", "encode.batch_size=16",
        "++multilabel.steps=30", "++multilabel.warmup_steps=10", "++multilabel.refresh_every=10",
        "++multilabel.pseudo.knn_k=5", "++multilabel.token_dim=16", "cluster.n_clusters=2", *extra,
        cache_dir=tmp / "cache")


def test_stages_end_to_end_on_tiny_mosaics(tmp_path, monkeypatch):
    root = make_mosaics(tmp_path / "mosaics")
    # stage=pseudolabel stops after the pseudo-labels: no retrain metrics
    m1 = pipeline.run(tiny_ml_config(root, tmp_path, "stage=pseudolabel"), tmp_path / "pl")
    assert not [k for k in m1 if k.startswith("retrain/")]
    for k in ("pseudolabel/precision", "pseudolabel/recall", "pseudolabel/coverage", "contexts/n_contexts",
              "encode/n_images", "cluster/n_points", "val/map", "val/n_heldout"):
        assert k in m1, k
    assert 0 <= m1["val/map"] <= 1 and 0 <= m1["pseudolabel/coverage"] <= 1
    table = multilabel_csv_table(tiny_ml_config(root, tmp_path).data)
    n_unl = int((table.train & ~table.labeled).sum())
    run_dir = tmp_path / "pl"
    rows = list(csv.DictReader((run_dir / "pseudolabels_multilabel.csv").open()))
    assert len(rows) == n_unl * 4 and set(rows[0]) >= {"id", "path", "label", "score", "decision", "masked", "true"}
    generic = list(csv.DictReader((run_dir / "pseudolabels.csv").open()))
    assert len(generic) == n_unl and generic[0]["label_id"] == "-1"
    assert all(set(r["label"].split("|")) <= set(COLOURS) | {""} for r in generic)
    assert json.loads((run_dir / "contexts.json").read_text())["classes"] == list(COLOURS)
    # stage=retrain afterwards reuses the pseudolabel artifact: no backbone, no labeler fit
    import ssl_pipeline.multilabel.features as feat
    import ssl_pipeline.multilabel.labeler as labmod

    # (the backbone is loaded once more by the model export: its eval transform and, for a random init, its tower)
    monkeypatch.setattr(feat, "encode_tokens_into", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-encoded")))
    monkeypatch.setattr(labmod.CSALabeler, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-fit")))
    m2 = pipeline.run(tiny_ml_config(root, tmp_path, "stage=report"), tmp_path / "rt")
    a1 = json.loads((tmp_path / "pl" / "artifacts.json").read_text())
    a2 = json.loads((tmp_path / "rt" / "artifacts.json").read_text())
    assert a1["pseudolabel"] == a2["pseudolabel"] and a1["cluster"] == a2["cluster"]
    for k in ("retrain/test_map", "retrain/labeled_only_test_map", "retrain/gain", "val/retrain_map"):
        assert k in m2, k
    assert m2["val/map"] == m2["val/retrain_map"] and 0 <= m2["retrain/test_map"] <= 1
    assert (tmp_path / "rt" / "pseudolabels.csv").read_bytes() == (run_dir / "pseudolabels.csv").read_bytes()
    # the report stage draws the per-label decisions of a multi-label run
    pngs = sorted(p.name for p in (tmp_path / "rt" / "report").glob("*.png"))
    assert m2["report/n_figures"] >= 1 and any("multilabel" in p for p in pngs), pngs
    html = (tmp_path / "rt" / "report.html").read_text()
    assert "Multi-label pseudo-label decisions" in html and "precision" in html


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    root = make_mosaics(tmp_path / "mosaics", n=32)
    (root / "img" / "005.png").write_bytes(b"not an image")
    m = pipeline.run(tiny_ml_config(root, tmp_path, "stage=encode"), tmp_path / "run")
    assert m["encode/n_skipped"] == 1 and "retrain/test_map" not in m
    assert "005.png" in (tmp_path / "run" / "skipped.csv").read_text()


def test_bad_settings_name_their_key(tmp_path):
    root = make_mosaics(tmp_path / "mosaics", n=16)
    with pytest.raises(ConfigError, match="multilabel.pseudo.band"):
        mlset.settings(tiny_ml_config(root, tmp_path, "++multilabel.pseudo.band=1.5"))
    with pytest.raises(ConfigError, match="multilabel.nope"):
        mlset.settings(tiny_ml_config(root, tmp_path, "++multilabel.nope=1"))
