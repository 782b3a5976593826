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
