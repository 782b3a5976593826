"""loss=simcse_pp and loss=samtone in retrain=finetune: end to end through the CLI on tiny images, and their parts."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, make_config, tiny_overrides

FT = ["retrain=finetune", "retrain.steps=6", "retrain.batch_size=8", "retrain.eval_batch_size=32",
      "retrain.log_every=1", "retrain.checkpoint_every=6"]


def _cli(tmp_path: Path, root: Path, *extra: str) -> dict:
    run = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *tiny_overrides(root), *FT, *extra,
                        f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads((run / "metrics.json").read_text())


def _logged(run: Path, phase: str) -> set[str]:
    names = set()
    for f in (run / "retrain_logs" / phase).glob("version_*/metrics.csv"):
        with f.open() as fh:
            names |= {k for r in csv.DictReader(fh) for k, v in r.items() if v not in ("", None)}
    return names


def test_cli_finetune_simcse_pp_adds_the_unlabeled_objective(tmp_path, image_root):
    # unfreeze_last=1: a frozen prefix, so the view bank (weak and strong views) feeds the objective
    m = _cli(tmp_path, image_root, "loss=simcse_pp", "loss.unlabeled_batch=4", "retrain.tower.unfreeze_last=1",
             "retrain.tower.cache_views=2")
    m = m.get("metrics", m)
    assert m["retrain/mode"] == "finetune" and m["retrain/unlabeled_objective"] == "simcse_pp"
    assert m["retrain/n_unlabeled"] > 0 and 0.0 <= m["retrain/test_accuracy"] <= 1.0
    assert m["retrain/cache_views"] == 2
    # the SimCSE++ term is computed (and logged) on the unlabeled images in the semi-supervised round
    assert "train/loss_simcse" in _logged(tmp_path / "run", "round1")


def test_cli_finetune_samtone_trains_against_the_class_table(tmp_path, image_root):
    m = _cli(tmp_path, image_root, "loss=samtone")
    m = m.get("metrics", m)
    assert m["retrain/mode"] == "finetune" and m["retrain/class_table"] == "prototypes"  # tiny CLIP: no text tower
    assert 0.0 <= m["retrain/test_accuracy"] <= 1.0
    assert "train/loss" in _logged(tmp_path / "run", "round1")


def test_samtone_finetune_class_table_starts_at_the_text_prompts(tmp_path, image_root, monkeypatch):
    """With a text tower the class table starts at the class-prompt embeddings (the tiny CLIP's text tower,
    declared trained here)."""
    from ssl_pipeline import backbones
    from ssl_pipeline.retrain.finetune import Finetuner

    real = backbones.load_backbone

    def with_text(*a, **k):
        b = real(*a, **k)
        b.has_text = True
        return b

    monkeypatch.setattr(backbones, "load_backbone", with_text)
    cfg = make_config(*tiny_overrides(image_root), *FT, "loss=samtone", cache_dir=tmp_path / "c")
    from ssl_pipeline.data.sources import image_folder_table

    table = image_folder_table(cfg.data)
    ft = Finetuner(cfg, table, None, None, "k", tmp_path / "run")
    assert ft.class_text is not None and ft.class_text.shape == (len(table.classes), ft.backbone.embed_dim)
    net = ft.new_net()
    ft.init_head(net, None)
    assert ft.class_table == "text"
    torch.testing.assert_close(net.head[-1].weight.detach(), ft.class_text)


def test_simcse_pp_settings_are_checked(tmp_path, image_root):
    from ssl_pipeline import pipeline
    from ssl_pipeline.errors import ConfigError

    for bad, key in (("loss.unlabeled_batch=1", "loss.unlabeled_batch"), ("loss.dropout=1.5", "loss.dropout")):
        cfg = make_config(*tiny_overrides(image_root), *FT, "loss=simcse_pp", bad, cache_dir=tmp_path / "c")
        with pytest.raises(ConfigError) as e:
            pipeline.run(cfg, tmp_path / "r")
        assert e.value.key == key
