"""Backbones through open_clip: the offline wheel tower, tiny JSON models, clear offline errors."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ssl_pipeline.backbones import load_backbone
from ssl_pipeline.errors import BackboneLoadError, ConfigError


def test_effnet_wheel_weights_are_imagenet_not_random():
    b = load_backbone(OmegaConf.create({"model": "effnet-lite0", "pretrained": "wheel", "image_size": 64}))
    assert b.embed_dim == 1280 and b.image_size == 64 and not b.has_text
    bn = b.model.visual.trunk.bn1
    # trained BatchNorm statistics, not the fresh init (mean 0 / var 1)
    assert bn.running_mean.abs().sum() > 0 and not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    e = b.encode_images(torch.zeros(2, 3, 64, 64))
    assert e.shape == (2, 1280)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(2))


def test_tiny_model_is_deterministic_and_has_a_text_tower_api():
    cfg = OmegaConf.create({"model": "tiny-clip", "pretrained": None, "image_size": 32})
    a, b = load_backbone(cfg), load_backbone(cfg)
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(a.encode_images(x), b.encode_images(x))
    assert a.encode_texts(["a photo of a cat.", "a dog"]).shape == (2, a.embed_dim)


def test_missing_checkpoint_file_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="backbone.pretrained"):
        load_backbone(OmegaConf.create({"model": "tiny-clip", "pretrained": str(tmp_path / "nope.pt")}))


def test_offline_tag_download_fails_with_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneLoadError, match="backbone.pretrained=/path"):
        load_backbone(OmegaConf.create({"model": "tiny-clip", "pretrained": "no_such_tag_anywhere"}))


def test_local_checkpoint_loads(tmp_path):
    cfg = OmegaConf.create({"model": "tiny-clip", "pretrained": None, "image_size": 32})
    a = load_backbone(cfg)
    path = tmp_path / "tiny.pt"
    torch.save(a.model.state_dict(), path)
    b = load_backbone(OmegaConf.create({"model": "tiny-clip", "pretrained": str(path), "image_size": 32,
                                        "init_seed": 123}))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_images(x), b.encode_images(x))
