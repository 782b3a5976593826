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
    atomic_write,
    atomic_write_text,
    stable_hash,
    write_json,
)
from ssl_pipeline.data.sources import load_embeddings_file
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import DataError

if TYPE_CHECKING:  # torch is imported where images are encoded: an embeddings-only run never loads it
    import torch

log = logging.getLogger(__name__)


class EmbeddingStore:
    """Read access to an encode artifact.

    Attributes
    ----------
    rows : (M,) int64
        Table rows that have an embedding (unreadable images are absent).
    dim : int
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        shard_dir = self.path / "shards"
        self.shards = sorted(shard_dir.glob("emb_*.npy"))
        self.rows = np.concatenate([np.load(shard_dir / f.name.replace("emb_", "rows_")) for f in self.shards]) \
            if self.shards else np.zeros(0, np.int64)
        self.meta = json.loads((self.path / "meta.json").read_text()) if (self.path / "meta.json").exists() else {}
        self.dim = int(np.load(self.shards[0], mmap_mode="r").shape[1]) if self.shards else 0

    def load(self, dtype=np.float32) -> np.ndarray:
        """All embeddings (M, D) in ``dtype``, shard by shard (memory-mapped reads)."""
        out = np.empty((len(self.rows), self.dim), dtype)
        s = 0
        for f in self.shards:
            a = np.load(f, mmap_mode="r")
            out[s:s + len(a)] = a
            s += len(a)
        return out

    def matrix(self) -> np.ndarray:
        """All embeddings (M, D) float16 as one read-only memory map, in store order.

        A single shard is mapped directly; several are first concatenated, shard by
        shard, into ``embeddings.npy`` beside them (written once, atomically; a
        float16 file of M x D x 2 bytes). Later stages read rows through the map, so
        their memory does not grow with a float32 copy of all embeddings; where the
        folder cannot be written, the float16 rows are read into memory instead.
        """
        if len(self.shards) == 1:
            return np.load(self.shards[0], mmap_mode="r")
        f = self.path / "embeddings.npy"
        if not f.exists():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (len(self.rows), self.dim)}

            def write(fh):
                np.lib.format.write_array_header_1_0(fh, header)
                for shard in self.shards:
                    fh.write(np.ascontiguousarray(np.load(shard, mmap_mode="r"), np.float16).tobytes())

            try:
                atomic_write(f, write)
            except OSError as e:
                log.warning("embeddings: cannot write %s (%s); reading the shards into memory", f, e)
                return self.load(np.float16)
        a = np.load(f, mmap_mode="r")
        if a.shape != (len(self.rows), self.dim):
            raise DataError(f"{f}: shape {a.shape} does not match the shards ({len(self.rows)}, {self.dim}); "
                            "delete it to rebuild")
        return a

    def text_embeddings(self) -> np.ndarray | None:
        f = self.path / "text_embeddings.npy"
        return np.load(f).astype(np.float32) if f.exists() else None

    def skipped(self) -> list[dict]:
        f = self.path / "skipped.csv"
        if not f.exists():
            return []
        with f.open() as fh:
            return list(csv.DictReader(fh))


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


def run(cfg: DictConfig, table: SampleTable, cache: ArtifactCache, force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the encode stage; return (artifact dir, metrics, key)."""
    key = cache.key("encode", encode_key_config(cfg, table))
    final = cache.path("encode", key)
    if cache.is_complete("encode", key) and not force:
        log.info("encode: reusing %s", final)
        return final, json.loads((final / "stage_metrics.json").read_text()), key
    if cfg.data.kind == "embeddings":
        with cache.writing("encode", key) as tmp:
            metrics = _import_embeddings(table, cfg, tmp)
            write_json(tmp / "stage_metrics.json", metrics)
        return final, metrics, key
    partial = cache.partial_path("encode", key)
    metrics = _encode_images(table, cfg, partial)
    write_json(partial / "stage_metrics.json", metrics)
    cache.commit("encode", key, partial)
    return final, metrics, key
