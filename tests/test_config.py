"""Every config group composes with the root config, and the defaults describe the demo."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from tests.conftest import CONF, make_config

GROUPS = {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in CONF.iterdir() if d.is_dir()}


def test_default_is_the_demo_pipeline():
    cfg = make_config()
    assert cfg.data.kind == "demo"
    assert cfg.stage == "retrain"
    assert cfg.backbone.name == "effnet_lite0"


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_option_composes(group, option):
    extra = []
    if group == "data" and option in ("image_folder", "multilabel_csv"):
        extra = ["data.root=/nonexistent"]
    cfg = make_config(f"{group}={option}", *extra)
    assert cfg[group] is not None


@pytest.mark.parametrize("option", GROUPS.get("pseudolabel", []))
def test_every_labeler_instantiates(option):
    cfg = make_config(f"pseudolabel={option}")
    lab = instantiate(cfg.pseudolabel.labeler)
    assert hasattr(lab, "fit") and hasattr(lab, "get_params")


# -- every option of every group, run end to end on tiny data (or refused at once, before any work) ----------

def _run(tmp_path, *ov: str) -> dict:
    from ssl_pipeline import pipeline

    cfg = make_config(*ov, cache_dir=tmp_path / "cache")
    return pipeline.run(cfg, tmp_path / "run")


def _refused(tmp_path, key: str, *ov: str) -> str:
    from ssl_pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        _run(tmp_path, *ov)
    assert e.value.key == key and "\n" not in str(e.value)
    assert not any((tmp_path / "cache" / s).exists() for s in ("encode", "cluster", "pseudolabel", "retrain"))
    return str(e.value)


HEAD = ["retrain.steps=20", "stage=retrain"]
RUNS_IN = {"head": {"ce", "asl", "samtone"}, "finetune": {"ce", "asl", "samtone", "simcse_pp"}}


@pytest.mark.parametrize("option", GROUPS["loss"])
def test_every_loss_runs_in_the_head_or_is_refused_at_once(tmp_path, embeddings_file, option):
    ov = ["data=embeddings", f"data.path={embeddings_file}", f"loss={option}", *HEAD, "retrain.steps=400"]
    if option in RUNS_IN["head"]:  # it really trains: well above chance (0.25) on the 4 blobs
        m = _run(tmp_path, *ov)
        assert m["retrain/test_accuracy"] >= 0.8 and m["retrain/world_size"] == 1
    else:
        msg = _refused(tmp_path, "loss", *ov)
        assert f"loss={option}" in msg and "retrain=head accepts loss=ce, asl, samtone" in msg


@pytest.mark.parametrize("option", GROUPS["loss"])
def test_every_loss_runs_in_finetune_or_is_refused_at_once(tmp_path, image_root, option):
    from tests.conftest import tiny_overrides

    ov = [*tiny_overrides(image_root), "retrain=finetune", "retrain.steps=3", "retrain.batch_size=8",
          "retrain.tower.cache_views=0", "retrain.eval_batch_size=32", f"loss={option}"]
    if option in RUNS_IN["finetune"]:
        m = _run(tmp_path, *ov)
        assert "retrain/test_accuracy" in m and m["retrain/mode"] == "finetune"
    else:
        msg = _refused(tmp_path, "loss", *ov)
        assert "retrain=finetune accepts loss=ce, asl, samtone, simcse_pp" in msg


def test_losses_are_refused_on_multilabel_data(tmp_path):
    msg = _refused(tmp_path, "loss", "data=multilabel_demo", "data.n_images=40", "loss=asl")
    assert "multilabel.asl" in msg


@pytest.mark.parametrize("option", GROUPS["pseudolabel"])
def test_every_labeler_runs(tmp_path, embeddings_file, option):
    m = _run(tmp_path, "data=embeddings", f"data.path={embeddings_file}", f"pseudolabel={option}",
             "stage=pseudolabel")
    assert m["pseudolabel/accuracy"] > 0.5


@pytest.mark.parametrize("option", GROUPS["backbone"])
def test_every_backbone_encodes_or_says_why_not(tmp_path, image_root, option):
    from tests.conftest import tiny_overrides

    ov = [*tiny_overrides(image_root, stage="encode"), f"backbone={option}"]
    if option == "clip_vit_b32":  # open_clip hub weights: runs where they are cached, else one clear line
        from ssl_pipeline.errors import BackboneLoadError

        try:
            m = _run(tmp_path, *ov)
        except BackboneLoadError as e:
            assert "\n" not in str(e).strip()
            return
    else:
        m = _run(tmp_path, *ov)
    assert m["encode/n_images"] == 42 and m["encode/world_size"] == 1


@pytest.mark.parametrize("option", GROUPS["data"])
def test_every_data_source_runs(tmp_path, image_root, embeddings_file, option):
    from tests.conftest import tiny_overrides

    if option == "demo":  # the real 5,000 digits (encode only here; the full demo run is tests/test_demo.py)
        ov = ["data=demo", "backbone=tiny", "stage=encode"]
    elif option == "embeddings":
        ov = ["data=embeddings", f"data.path={embeddings_file}", *HEAD]
    elif option == "image_folder":
        ov = [*tiny_overrides(image_root), *HEAD]
    elif option == "multilabel_demo":
        ov = ["data=multilabel_demo", "data.n_images=60", "backbone=tiny", "multilabel.steps=10",
              "multilabel.warmup_steps=5", "stage=retrain"]
    else:  # multilabel_csv: a manifest over the image folder (colour classes as labels)
        rows = sorted((image_root / "train").rglob("*.png"))
        names = ["red", "green", "blue"]
        lines = ["file," + ",".join(names)]
        lines += [f"{p.relative_to(image_root / 'train')}," + ",".join(str(int(p.parent.name == n) | int(i % 5 == 0))
                                                                    for n in names) for i, p in enumerate(rows)]
        (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
        ov = ["data=multilabel_csv", f"data.root={image_root / 'train'}", f"data.manifest={tmp_path / 'm.csv'}",
              "data.labeled_fraction=0.3", "data.image_size=32", "backbone=tiny", "multilabel.steps=10",
              "multilabel.warmup_steps=5", "stage=retrain"]
    m = _run(tmp_path, *ov)
    assert m["encode/n_images"] > 0


@pytest.mark.parametrize("option", [pytest.param(o, marks=pytest.mark.slow) if o == "ddp" else o
                                    for o in GROUPS["trainer"]])
def test_every_trainer_runs_or_is_refused_at_once(tmp_path, embeddings_file, option):
    import json
    import subprocess
    import sys

    import torch

    from tests.conftest import ROOT

    ov = ["data=embeddings", f"data.path={embeddings_file}", f"trainer={option}", *HEAD]
    if option == "gpu" and not torch.cuda.is_available():
        assert "no CUDA device" in _refused(tmp_path, "trainer.accelerator", *ov)
    elif option == "ddp":  # Lightning re-launches the command for rank 1: through the command line
        p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *ov, "trainer.accelerator=cpu",
                            f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        assert json.loads((tmp_path / "run" / "metrics.json").read_text())["retrain/world_size"] == 2
    else:
        assert _run(tmp_path, *ov)["retrain/world_size"] == 1


@pytest.mark.parametrize("group", ["cluster", "multilabel", "retrain"])
def test_single_option_groups_run(tmp_path, embeddings_file, image_root, group):
    """cluster and multilabel have one option each (the default, run by every test above); retrain: both."""
    for option in GROUPS[group]:
        if group == "retrain" and option == "finetune":
            continue  # run by test_every_loss_runs_in_finetune_or_is_refused_at_once
        m = _run(tmp_path / option, "data=embeddings", f"data.path={embeddings_file}", f"{group}={option}", *HEAD)
        assert "retrain/test_accuracy" in m
