"""Stage 1, encode: images -> L2-normalised float16 embeddings in shards (+ class-name text embeddings).

Artifact folder::

    shards/emb_00000.npy    (n_ok, D) float16, rows in table order
    shards/rows_00000.npy   (n_ok,) int64 table rows encoded in that shard
    shards/skip_00000.json  [[row, reason], ...] unreadable images of that shard
    text_embeddings.npy     (C, D) float16, when the backbone has a trained text tower
    skipped.csv             id, path, reason of every unreadable image
    meta.json

Shards are written as encode proceeds; a killed encode resumes from its
finished shards (``<key>.partial/``) and gives identical results, since shard
boundaries and batch composition are fixed by the config.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import (
    ArtifactCache,
    atomic_save_npy,
    atomic_write_text,
    stable_hash,
    write_json,
)
from ssl_pipeline.data.sources import draw_labeled, load_embeddings_file
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import DataError
from ssl_pipeline.stage_io import EmbeddingStore
from ssl_pipeline.stages.base import CachedStage, Context, StageResult

if TYPE_CHECKING:  # torch is imported where images are encoded: an embeddings-only run never loads it
    import torch

log = logging.getLogger(__name__)


def data_fingerprint(table: SampleTable) -> str:
    """Identity of the images/embeddings behind a table: ids plus file size and mtime."""
    if "path" in table.meta:  # an embeddings file
        st = os.stat(table.meta["path"])
        return stable_hash([table.meta["path"], st.st_size, st.st_mtime_ns])
    stats = []
    for i, p in zip(table.ids, table.paths):
        if p is None:
            stats.append(i)
        else:
            try:
                st = os.stat(p)
                stats.append((i, p, st.st_size, st.st_mtime_ns))
            except OSError:
                stats.append((i, p, -1, -1))
    return stable_hash([table.meta.get("source"), stats])


def encode_key_config(cfg: DictConfig, table: SampleTable) -> dict:
    """What determines the encode artifact: the images, the backbone, shard size and precision."""
    return {
        "data": data_fingerprint(table),
        "kind": cfg.data.kind,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True) if cfg.data.kind != "embeddings" else None,
        "shard_size": int(cfg.encode.shard_size),
        "precision": cfg.encode.precision if cfg.data.kind != "embeddings" else None,
        "templates": list(cfg.encode.text_templates) if cfg.data.kind != "embeddings" else None,
        "classes": table.classes,
    }


def pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("encode.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = full fp32)."""
    import torch

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision in ("auto", "bf16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise DataError(f"encode.precision must be auto, fp32, bf16 or fp16, got {precision!r}")


def _import_embeddings(table: SampleTable, cfg: DictConfig, out: Path) -> dict:
    """data=embeddings: validate, L2-normalise and store the file's X as float16 shards."""
    arrays = load_embeddings_file(table.meta["path"])
    X = arrays["X"]
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    S = int(cfg.encode.shard_size) * 64
    for s, start in enumerate(range(0, len(X), S)):
        chunk = np.asarray(X[start:start + S], np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        atomic_save_npy(shard_dir / f"emb_{s:05d}.npy", chunk.astype(np.float16))
        atomic_save_npy(shard_dir / f"rows_{s:05d}.npy", np.arange(start, start + len(chunk), dtype=np.int64))
    write_json(out / "meta.json", {"source": "embeddings", "path": table.meta["path"], "dim": int(X.shape[1])})
    atomic_write_text(out / "skipped.csv", "id,path,reason\n")
    return {"encode/n_images": len(X), "encode/n_skipped": 0, "encode/dim": int(X.shape[1])}


def write_skipped(table: SampleTable, shard_dir: Path, n_shards: int, path: Path) -> list:
    """Gather the ``skip_<s>.json`` lists of ``n_shards`` shards (row order) into ``path`` (CSV: id, path, reason)."""
    skipped = []
    for s in range(n_shards):
        skipped.extend(json.loads((shard_dir / f"skip_{s:05d}.json").read_text()))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "path", "reason"])
    for row, reason in skipped:
        w.writerow([table.ids[row], table.paths[row] or "", reason])
    atomic_write_text(path, buf.getvalue())
    return skipped


def write_text_embeddings(backbone, classes: list[str], templates, path: Path) -> None:
    """(C, d) float16 class-name text embeddings (prompt templates averaged, L2-normalised) into ``path``.

    Nothing is written when the backbone has no trained text tower or there are no class names.
    """
    import torch

    if not (backbone.has_text and classes):
        return
    prompts = [t.format(c.replace("_", " ")) for c in classes for t in templates]
    T = backbone.encode_texts(prompts).reshape(len(classes), len(templates), -1).mean(1)
    atomic_save_npy(path, torch.nn.functional.normalize(T, dim=-1).cpu().numpy().astype(np.float16))


def _encode_images(table: SampleTable, cfg: DictConfig, partial: Path) -> dict | None:
    """Encode every row of ``table`` into shards under ``partial`` (resuming finished shards).

    The one shard loop (:func:`~ssl_pipeline.stages.predict_writer.encode_shards`, Lightning
    ``Trainer.predict``) runs on one device or, with ``trainer=ddp trainer.devices=N``, on N
    processes; returns the metrics on rank 0 (re-launched DDP workers exit after the loop).
    """
    from ssl_pipeline.backbones import load_backbone
    from ssl_pipeline.engine import DDPSection
    from ssl_pipeline.stages.predict_writer import encode_shards

    ecfg = cfg.encode
    N, S = len(table), int(ecfg.shard_size)
    shard_dir = partial / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(N / S)
    todo = [s for s in range(n_shards) if not (shard_dir / f"rows_{s:05d}.npy").exists()]
    if n_shards - len(todo):
        log.info("encode: resuming, %d of %d shards already done", n_shards - len(todo), n_shards)
    backbone = load_backbone(cfg.backbone, device="cpu")  # Lightning moves it to the trainer's device
    with DDPSection():  # DDP workers exit at its end: rank 0 alone gathers the shards and writes the rest
        n_new, seconds, world = encode_shards(table, cfg, shard_dir, todo, backbone) if todo else (0, 0.0, 1)
    device = next(backbone.model.parameters()).device
    ips = n_new / seconds if n_new and seconds > 0 else 0.0
    if n_new:
        log.info("encode: %d images in %.1fs, %.1f images/s on %s x %d", n_new, seconds, ips, device, world)
    skipped = write_skipped(table, shard_dir, n_shards, partial / "skipped.csv")
    write_text_embeddings(backbone, table.classes, ecfg.text_templates, partial / "text_embeddings.npy")
    write_json(partial / "meta.json", {"source": "images", "backbone": backbone.name, "dim": backbone.embed_dim,
                                       "image_size": backbone.image_size, "device": str(device)})
    metrics = {"encode/n_images": N, "encode/n_skipped": len(skipped), "encode/dim": backbone.embed_dim,
               "encode/world_size": int(world)}
    if n_new:
        metrics["encode/images_per_s"] = round(ips, 2)
    return metrics


class Encode(CachedStage):
    """Stage 1: images (or an embeddings file) -> embedding shards; multi-label data adds spatial tokens."""

    name = "encode"

    def key(self, ctx: Context) -> str:
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.features import key_config

            return ctx.cache.key("encode", key_config(ctx.cfg, ctx.table))
        return ctx.cache.key("encode", encode_key_config(ctx.cfg, ctx.table))

    def partial(self, ctx: Context) -> bool:
        return ctx.cfg.data.kind != "embeddings"  # image encoding resumes from its finished shards

    def build(self, ctx: Context, out: Path) -> dict:
        if ctx.cfg.data.kind == "embeddings":
            return _import_embeddings(ctx.table, ctx.cfg, out)
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.features import encode_tokens_into

            return encode_tokens_into(ctx.cfg, ctx.table, out)
        return _encode_images(ctx.table, ctx.cfg, out)

    def export(self, ctx: Context, result: StageResult) -> None:
        """``skipped.csv`` into the run directory; the embedding store for later stages; labels redrawn
        among the readable images when some labeled image could not be read."""
        atomic_write_text(ctx.run_dir / "skipped.csv", (result.path / "skipped.csv").read_text())
        store = EmbeddingStore(result.path)
        ctx.state["store"] = store
        if ctx.cfg.stage == "encode":
            return
        available = np.zeros(len(ctx.table), bool)
        available[store.rows] = True
        if not available.any():
            raise DataError("no image of the table could be read (see skipped.csv)")
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.labeler import redraw_labeled

            redraw_labeled(ctx.table, available, int(ctx.cfg.seed))
        elif not available.all():
            log.warning("%d of %d images could not be read and were skipped (see skipped.csv)",
                        int((~available).sum()), len(ctx.table))
            draw_labeled(ctx.table, ctx.cfg.data, available)


ENCODE = Encode()


def run(cfg: DictConfig, table: SampleTable, cache: ArtifactCache, force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the encode stage on its own; return (artifact dir, metrics, key)."""
    ctx = Context(OmegaConf.merge(cfg, {"stage": "encode", "force": ["encode"] if force else []}), table, cache,
                  Path(cache.root) / "_runs")
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    r = ENCODE.run(ctx)
    return r.path, r.metrics, r.key
