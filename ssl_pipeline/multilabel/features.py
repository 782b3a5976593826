"""Spatial tokens + pooled embeddings of a multi-label table, cached and resumable.

The multi-label head needs more than one pooled vector per image: it attends
over the backbone's *spatial tokens*.

* timm conv trunk (EfficientNet-Lite0): ``trunk.forward_features(x)`` gives the
  (B, C, h, w) feature map; its h*w positions are the tokens (C = 1280), and
  the pooled embedding is their mean (the trunk's own average pool).
* open_clip ViT: the patch tokens after ``ln_post``, mapped through the visual
  projection ``proj`` (so they live in the image-text space, as in MaskCLIP);
  the pooled embedding is the model's own ``encode_image``.

Images are resized to ``size x size`` *without cropping* (squashed): a centre crop
would cut off objects near the borders, which matter for multi-label scenes.

Artifact folder (the encode stage on multi-label data; see :mod:`ssl_pipeline.stage_io`)::

    shards/tok_00000.npy    (n_ok, P, d) float16 spatial tokens (P = h*w), table order
    shards/emb_00000.npy    (n_ok, D) float16 L2-normalised pooled embeddings (read by EmbeddingStore)
    shards/rows_00000.npy   (n_ok,) int64 table rows of that shard (written last = shard complete)
    shards/skip_00000.json  [[row, reason], ...]
    text_embeddings.npy     (C, d) float16, only when the backbone has a trained text tower
    skipped.csv, meta.json, stage_metrics.json
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.stage_io import TokenFeatures, load_features  # noqa: F401 - re-exported
from ssl_pipeline.stages.encode import (
    data_fingerprint,
    write_skipped,
    write_text_embeddings,
)

log = logging.getLogger(__name__)


def squash_transform(backbone, size: int):
    """PIL image -> (3, size, size) tensor: resize without crop, the backbone's own normalisation."""
    from torchvision import transforms as T

    norm = next((t for t in getattr(backbone.preprocess, "transforms", []) if isinstance(t, T.Normalize)), None)
    mean, std = (norm.mean, norm.std) if norm is not None else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.ToTensor(), T.Normalize(mean, std)])


def token_size(cfg: DictConfig) -> int | None:
    """The input size for spatial tokens: ``data.image_size`` when set, else the backbone's own."""
    s = cfg.data.get("image_size")
    return int(s) if s else None


@torch.inference_mode()
def extract(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Images (B, 3, S, S) -> (tokens (B, P, d), pooled (B, D) L2-normalised, grid (h, w))."""
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(trunk, "forward_features"):
        fmap = trunk.forward_features(x)
        if fmap.ndim != 4:
            raise TypeError(f"trunk.forward_features returned shape {tuple(fmap.shape)}, expected (B, C, h, w)")
        b, c, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2).float()
        pooled = visual.head(trunk.forward_head(fmap)) if hasattr(trunk, "forward_head") else tokens.mean(1)
        return tokens, torch.nn.functional.normalize(pooled.float(), dim=-1), (h, w)
    if hasattr(visual, "output_tokens"):
        old = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = old
        if getattr(visual, "proj", None) is not None:
            tokens = tokens @ visual.proj
        p = tokens.shape[1]
        h = int(math.isqrt(p))
        grid = (h, p // h) if h * (p // h) == p else (1, p)
        return tokens.float(), torch.nn.functional.normalize(pooled.float(), dim=-1), grid
    raise TypeError(f"cannot take spatial tokens from a {type(visual).__name__} image tower "
                    "(supported: timm conv trunks and open_clip VisionTransformer)")


def key_config(cfg: DictConfig, table: SampleTable) -> dict:
    if cfg.data.kind == "embeddings":  # an embeddings file: imported as pooled shards, no backbone, no tokens
        return {"data": data_fingerprint(table), "kind": "embeddings", "shard_size": int(cfg.encode.shard_size),
                "classes": table.classes, "multilabel": True}
    return {
        "data": data_fingerprint(table),
        "kind": cfg.data.kind,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "size": token_size(cfg),
        "shard_size": int(cfg.encode.shard_size),
        "precision": cfg.encode.precision,
        "templates": list(cfg.encode.text_templates),
        "classes": table.classes,
        "version": 2,
    }


def pooled_features(path: Path, text=None) -> TokenFeatures:
    """An encode folder without spatial tokens (``data=embeddings``): each pooled embedding is one token.

    ``tokens`` (M, 1, D) float16, ``pooled`` (M, D) float32, ``grid`` (1, 1); ``text`` (C, D) from the
    embeddings file, if any. The alignment head then reduces to a label-specific head on pooled features
    (attention over a single token is the token itself).
    """
    import numpy as np

    from ssl_pipeline.stage_io import EmbeddingStore

    store = EmbeddingStore(path)
    pooled = store.load(np.float32)
    return TokenFeatures(rows=store.rows, tokens=pooled.astype(np.float16)[:, None, :], pooled=pooled, grid=(1, 1),
                         text=None if text is None else np.asarray(text, np.float32), skipped=[])


def features_of(path: Path, table: SampleTable) -> TokenFeatures:
    """The multi-label features of an encode folder: spatial tokens, or pooled-only for an embeddings file."""
    if table.meta.get("embeddings_only"):
        return pooled_features(path, table.meta.get("text"))
    return load_features(path)


def encode_tokens_into(cfg: DictConfig, table: SampleTable, partial: Path) -> dict:
    """Encode every row of ``table`` into token + pooled shards under ``partial`` (resuming finished shards)."""
    from ssl_pipeline.backbones import load_backbone

    ecfg = cfg.encode
    N, S = len(table), int(ecfg.shard_size)
    shard_dir = partial / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(N / S)
    todo = [s for s in range(n_shards) if not (shard_dir / f"rows_{s:05d}.npy").exists()]
    backbone = load_backbone(cfg.backbone, device="cpu")  # Lightning moves it to the encode device
    size = token_size(cfg)
    trunk = getattr(backbone.model.visual, "trunk", None)
    if size is None or trunk is None or not hasattr(trunk, "forward_features"):
        # a ViT's positional embedding fixes its input size: keep the model's own
        if size and size != backbone.image_size:
            log.info("multilabel encode: %s takes %d px images; data.image_size=%d ignored", backbone.name,
                     backbone.image_size, size)
        size = backbone.image_size
    tf = squash_transform(backbone, size)
    if len(todo) < n_shards:
        log.info("multilabel encode: resuming, %d of %d shards already done", n_shards - len(todo), n_shards)

    def tokens_and_pooled(model, x):
        tok, pool, _ = extract(model, x)
        return {"tok": tok, "emb": pool}

    from ssl_pipeline.engine import DDPSection
    from ssl_pipeline.stages.predict_writer import encode_shards

    with DDPSection():  # the encode stage's shard loop (one process or DDP); DDP workers exit at its end
        n_new, seconds, world = encode_shards(table, cfg, shard_dir, todo, backbone, outputs=tokens_and_pooled,
                                              transform=tf) if todo else (0, 0.0, 1)
    device = next(backbone.model.parameters()).device
    with torch.no_grad():  # the token grid, from a probe image
        _, _, grid = extract(backbone.model, torch.zeros(1, 3, size, size, device=device))
    skipped = write_skipped(table, shard_dir, n_shards, partial / "skipped.csv")
    write_text_embeddings(backbone, table.classes, ecfg.text_templates, partial / "text_embeddings.npy")
    write_json(partial / "meta.json", {"backbone": backbone.name, "image_size": size, "grid": list(grid),
                                       "device": str(device)})
    metrics = {"encode/n_images": N, "encode/n_skipped": len(skipped), "encode/image_size": size,
               "encode/n_tokens": int(grid[0] * grid[1]), "encode/world_size": int(world)}
    if n_new and seconds > 0:
        metrics["encode/images_per_s"] = round(n_new / seconds, 2)
        log.info("multilabel encode: %d images in %.1fs (%.1f images/s)", n_new, seconds, n_new / seconds)
    return metrics


def encode_tokens(cfg: DictConfig, table: SampleTable, cache: ArtifactCache,
                  force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the encode stage on multi-label data; return (artifact dir, metrics, key)."""
    from ssl_pipeline.stages.encode import run

    return run(cfg, table, cache, force)
