"""The exported model folder: written by every retrain, safetensors + JSON only, loaded back without unpickling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ssl_pipeline
from ssl_pipeline import pipeline
from ssl_pipeline.backbones import load_backbone
from ssl_pipeline.data.sources import build_table
from ssl_pipeline.errors import DataError
from ssl_pipeline.model.export import export_model
from ssl_pipeline.models.module import HeadModule
from ssl_pipeline.stages.encode import EmbeddingStore
from tests.conftest import make_config, make_image_folder, tiny_overrides

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
FT = ["retrain=finetune", "retrain.steps=6", "retrain.batch_size=16", "retrain.eval_batch_size=64",
      "retrain.tower.cache_views=0"]


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("head")
    root = make_image_folder(tmp / "images")
    cfg = make_config(*tiny_overrides(root), "retrain.steps=60", cache_dir=tmp / "cache")
    m = pipeline.run(cfg, tmp / "run")
    return tmp, root, cfg, m


def assert_no_pickle(folder: Path) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert p.suffix not in PICKLE_SUFFIXES, p
        data = p.read_bytes()
        if p.suffix == ".safetensors":  # 8-byte little-endian header length, then that much JSON, then raw tensors
            n = int.from_bytes(data[:8], "little")
            assert 0 < n <= len(data) - 8 and isinstance(json.loads(data[8:8 + n]), dict), f"{p.name}: not safetensors"
            continue
        assert data[:1] != b"\x80" and data[:2] != b"PK", f"{p.name} looks like a pickle / torch.save archive"


def test_retrain_writes_a_model_folder_without_pickle(head_run):
    tmp, _, _, m = head_run
    folder = tmp / "run" / "model"
    assert {p.name for p in folder.iterdir()} == {"model.json", "head.safetensors", "tower.safetensors"}
    assert_no_pickle(folder)
    doc = json.loads((folder / "model.json").read_text())
    assert doc["classes"] == ["blue", "green", "red"]
    assert doc["backbone_name"] == "tiny" and doc["backbone"]["model"] == "tiny-clip"
    assert doc["input_size"] == 32 and doc["preprocessing"]["crop"] == [32, 32]
    assert len(doc["preprocessing"]["mean"]) == 3 and len(doc["preprocessing"]["std"]) == 3
    assert doc["task"] == "single_label" and doc["thresholds"] is None
    assert doc["metrics"]["retrain/test_accuracy"] == pytest.approx(m["retrain/test_accuracy"])
    assert not list((tmp / "run").glob(".model.*")), "no temporary folder is left behind"


def _test_rows(cfg, tmp):
    table = build_table(cfg.data)
    store = EmbeddingStore(json.loads((tmp / "run" / "artifacts.json").read_text())["encode"])
    pos = np.flatnonzero(table.test[store.rows])
    return table, store, pos


def test_load_model_gives_the_heads_probabilities(head_run):
    tmp, _, cfg, m = head_run
    table, store, pos = _test_rows(cfg, tmp)
    emb = store.load()[pos]
    rt = Path(json.loads((tmp / "run" / "artifacts.json").read_text())["retrain"])
    sd = torch.load(rt / "head.pt", weights_only=True)
    head = HeadModule(emb.shape[1], 3)
    head.load_state_dict(sd)
    want = torch.softmax(head.eval()(torch.from_numpy(emb)), -1)
    model = ssl_pipeline.load_model(tmp / "run" / "model")
    assert isinstance(model, torch.nn.Module) and model.classes == table.classes
    # on the cached embeddings: exactly the head
    torch.testing.assert_close(model.predict_proba(torch.from_numpy(emb)), want, atol=1e-6, rtol=1e-5)
    # from the image files: the tower + preprocessing reproduce the cached embeddings, hence the probabilities
    paths = [table.paths[int(r)] for r in store.rows[pos]]
    P = model.predict_proba(paths)
    torch.testing.assert_close(P, want, atol=2e-3, rtol=1e-3)
    y = np.asarray(table.y_true)[store.rows[pos]]
    assert float((P.argmax(1).numpy() == y).mean()) == pytest.approx(m["retrain/test_accuracy"])
    # a preprocessed tensor gives the same
    x = torch.stack([model.transform(Image.open(p).convert("RGB")) for p in paths[:4]])
    torch.testing.assert_close(model.predict_proba(x), P[:4])
    assert model.predict(paths[:2]) == [model.classes[int(i)] for i in P[:2].argmax(1)]


def test_loading_never_unpickles(head_run, monkeypatch):
    import pickle

    tmp = head_run[0]

    def refuse(*a, **k):
        raise AssertionError("load_model must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    model = ssl_pipeline.load_model(tmp / "run" / "model")
    assert model.predict_proba(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_damaged_model_folders_raise_naming_the_file(head_run, tmp_path):
    import shutil

    src = head_run[0] / "run" / "model"
    bad = tmp_path / "model"
    shutil.copytree(src, bad)
    (bad / "head.safetensors").write_bytes((src / "head.safetensors").read_bytes()[:50])
    with pytest.raises(DataError, match="head.safetensors"):
        ssl_pipeline.load_model(bad)
    (bad / "model.json").unlink()
    with pytest.raises(DataError, match="model.json"):
        ssl_pipeline.load_model(bad)
    with pytest.raises(DataError, match="does not exist"):
        ssl_pipeline.load_model(tmp_path / "nowhere")


def test_rerun_replaces_the_model_folder_atomically(head_run):
    tmp, root, _, _ = head_run
    cfg = make_config(*tiny_overrides(root), "retrain.steps=61", cache_dir=tmp / "cache")
    before = (tmp / "run" / "model" / "head.safetensors").read_bytes()
    pipeline.run(cfg, tmp / "run")
    assert (tmp / "run" / "model" / "head.safetensors").read_bytes() != before
    assert not list((tmp / "run").glob(".model.*"))


def test_finetune_exports_the_trained_tower(tmp_path, image_root):
    cfg = make_config(*tiny_overrides(image_root), *FT, cache_dir=tmp_path / "cache")
    m = pipeline.run(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "model"
    assert (folder / "tower.safetensors").exists()
    assert_no_pickle(folder)
    doc = json.loads((folder / "model.json").read_text())
    assert doc["mode"] == "finetune" and doc["preprocessing"]["pre_shrink_min_side"] == 64
    model = ssl_pipeline.load_model(folder)
    pristine = load_backbone(cfg.backbone).model.visual.state_dict()
    trained = model.visual.state_dict()
    assert any(not torch.equal(trained[k], pristine[k]) for k in pristine), "the tower's trained weights load"
    table = build_table(cfg.data)
    test = np.flatnonzero(table.test)
    P = model.predict_proba([table.paths[i] for i in test])
    acc = float((P.argmax(1).numpy() == np.asarray(table.y_true)[test]).mean())
    assert acc == pytest.approx(m["retrain/test_accuracy"])


def test_multilabel_model_decides_at_its_thresholds(tmp_path):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    state = {"head.1.weight": lin.weight.detach(), "head.1.bias": lin.bias.detach()}
    with pytest.raises(ValueError, match="thresholds"):
        export_model(tmp_path / "m", classes=["a", "b", "c"], head_state=state, backbone_cfg=None, multilabel=True,
                     head={"kind": "linear", "in_dim": 4, "standardize": False}, thresholds=[0.5])
    export_model(tmp_path / "m", classes=["a", "b", "c"], head_state=state, backbone_cfg=None, multilabel=True,
                 head={"kind": "linear", "in_dim": 4, "standardize": False}, thresholds=[0.2, 0.5, 0.9],
                 metrics={"retrain/test_map": np.float64(0.5), "bad": float("nan")})
    model = ssl_pipeline.load_model(tmp_path / "m")
    assert model.multilabel and model.transform is None
    x = torch.randn(6, 4)
    P = model.predict_proba(x)
    torch.testing.assert_close(P, torch.sigmoid(lin(x)).detach())
    want = ["|".join(c for c, p, t in zip("abc", row, (0.2, 0.5, 0.9)) if p >= t) for row in P.tolist()]
    assert model.predict(x) == want
    assert json.loads((tmp_path / "m" / "model.json").read_text())["metrics"] == {"retrain/test_map": 0.5,
                                                                                   "bad": None}
    with pytest.raises(DataError, match="embeddings"):
        model.predict_proba(torch.zeros(1, 3, 8, 8))


def test_embeddings_run_exports_a_head_over_embeddings(tmp_path, embeddings_file):
    from ssl_pipeline.errors import ConfigError

    cfg = make_config("data=embeddings", f"data.path={embeddings_file}", "pseudolabel=knn", "retrain.steps=30",
                      cache_dir=tmp_path / "cache")
    m = pipeline.run(cfg, tmp_path / "run")
    model = ssl_pipeline.load_model(tmp_path / "run" / "model")
    assert model.config["input"] == "embeddings" and model.visual is None and model.transform is None
    a = np.load(embeddings_file)
    test = a["split"] == "test"
    X = a["X"][test] / np.linalg.norm(a["X"][test], axis=1, keepdims=True)
    P = model.predict_proba(torch.from_numpy(X.astype(np.float32)))
    assert float((P.argmax(1).numpy() == a["y_true"][test]).mean()) == pytest.approx(m["retrain/test_accuracy"])
    with pytest.raises(ConfigError, match="predict.model: .*embeddings"):
        pipeline.run(make_config("stage=predict", f"predict.model={tmp_path / 'run' / 'model'}",
                                 f"predict.images={tmp_path}"), tmp_path / "pred")
