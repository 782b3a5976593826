"""Inference with Lightning ``Trainer.predict`` across processes: each rank writes its own shard.

Two uses:

* :func:`encode_shards` - the encode stage's one shard loop (one process or DDP): encode shards
  (``shard_size`` table rows each) are dealt to the ranks; every rank writes the shards it
  encodes, in the encode artifact's own layout (``emb_/rows_/skip_NNNNN``, ``rows_`` last), so
  the result is byte-identical to a one-process encode and an interrupted run resumes from
  finished shards. Batches never cross a shard, exactly as in the one-process loop.
* :func:`predict_arrays` - any per-item inference (view banks, re-encoding with a retrained
  tower, test predictions): each rank writes ``part_<rank>.pt`` with the outputs of its
  contiguous slice of the items; after a barrier every rank reads all parts, merged by index.

Processes and DDP sections: see :mod:`ssl_pipeline.engine`.

``python -m ssl_pipeline.stages.predict_writer OVERRIDES --out DIR`` encodes the rows of a
config's data into ``DIR/shards`` (used by the DDP test; also handy on its own).
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig

from ssl_pipeline.artifacts import atomic_save_npy, atomic_write_text
from ssl_pipeline.engine import DDPSection, is_relaunched_worker, make_trainer, rank_slice, wants_ddp  # noqa: F401

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# generic per-item inference
# ---------------------------------------------------------------------------------------------


class ItemPredictor(L.LightningModule):
    """Runs ``fn(module, batch) -> dict[str, Tensor]`` (with an ``idx`` entry) over ``dataset``.

    ``net`` is registered so that Lightning moves it to the device.
    """

    def __init__(self, net: torch.nn.Module, dataset, fn, batch_size: int = 128, collate_fn=None,
                 num_workers: int = 0):
        super().__init__()
        self.net = net
        self.dataset, self.fn, self.batch_size = dataset, fn, int(batch_size)
        self.collate_fn, self.num_workers = collate_fn, int(num_workers)

    def predict_dataloader(self):
        start, stop = rank_slice(len(self.dataset), self.trainer.global_rank, self.trainer.world_size)
        sub = torch.utils.data.Subset(self.dataset, range(start, stop))
        return torch.utils.data.DataLoader(sub, batch_size=self.batch_size, shuffle=False,
                                           collate_fn=self.collate_fn, num_workers=self.num_workers)

    def predict_step(self, batch, batch_idx):
        with torch.no_grad():
            return self.fn(self.net, batch)


class PartWriter(BasePredictionWriter):
    """Collects a rank's outputs and writes them to ``<out_dir>/part_<rank>.pt`` at the end of predict."""

    def __init__(self, out_dir: Path):
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.parts: dict[str, list] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        for k, v in prediction.items():
            self.parts.setdefault(k, []).append(v.detach().cpu())

    def on_predict_epoch_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = {k: torch.cat(v) for k, v in self.parts.items()}
        tmp = self.out_dir / f".part_{trainer.global_rank}.pt.tmp"
        torch.save(out, tmp)
        os.replace(tmp, self.out_dir / f"part_{trainer.global_rank}.pt")
        self.parts = {}

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier("parts written")


def predict_arrays(net: torch.nn.Module, dataset, fn, out_dir: Path, tcfg=None, batch_size: int = 128,
                   collate_fn=None, num_workers: int = 0) -> dict[str, torch.Tensor]:
    """``fn`` over every item of ``dataset`` with ``Trainer.predict`` (sharded over the ranks).

    Returns ``{name: tensor}`` merged from every rank's part and ordered by the ``idx`` output
    (the item index), on every rank.
    """
    out_dir = Path(out_dir)
    trainer = make_trainer(tcfg, logger=False, callbacks=[PartWriter(out_dir)])
    world, rank = trainer.world_size, trainer.global_rank
    # each rank removes only its own file, and only once every rank has read it: a rank that clears the folder
    # at the start of the next call must not delete a part a slower rank is still reading from this call
    (out_dir / f"part_{rank}.pt").unlink(missing_ok=True)  # a stale part of an interrupted run
    trainer.predict(ItemPredictor(net, dataset, fn, batch_size, collate_fn, num_workers), return_predictions=False)
    parts = [torch.load(out_dir / f"part_{r}.pt", weights_only=True) for r in range(world)]
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # every rank has read every part
    (out_dir / f"part_{rank}.pt").unlink(missing_ok=True)
    parts = [p for p in parts if p]
    merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    order = torch.argsort(merged["idx"])
    return {k: v[order] for k, v in merged.items()}


# ---------------------------------------------------------------------------------------------
# encode shards
# ---------------------------------------------------------------------------------------------


class ShardBatches(torch.utils.data.Sampler):
    """Batches (positions into the table) of the shards of one rank; no batch crosses a shard. A rank
    without shards gets one empty batch (Lightning needs a non-empty loader on every rank)."""

    def __init__(self, shards: list[int], n_rows: int, shard_size: int, batch_size: int):
        self.shards, self.N, self.S, self.B = shards, n_rows, shard_size, batch_size

    def _batches(self):
        for s in self.shards:
            lo, hi = s * self.S, min(self.N, (s + 1) * self.S)
            for b in range(lo, hi, self.B):
                yield list(range(b, min(hi, b + self.B)))

    def __iter__(self):
        if not self.shards:  # a rank with no shard to do (fewer shards than ranks): one empty batch, no work
            return iter([[]])
        return self._batches()

    def __len__(self):
        if not self.shards:
            return 1
        return sum(math.ceil((min(self.N, (s + 1) * self.S) - s * self.S) / self.B) for s in self.shards)


def pooled_embeddings(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The encode stage's outputs of a batch (B, 3, S, S): ``emb`` (B, D) L2-normalised."""
    return {"emb": torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1)}


class EncodeModule(L.LightningModule):
    """predict_step: a batch of images -> ``outputs(model, x)`` as float16 arrays, with their rows and skips.

    ``outputs`` maps (model, images (B, 3, S, S)) to named tensors with B rows (default
    :func:`pooled_embeddings`; multi-label encoding adds spatial tokens); ``transform`` turns a
    PIL image into the model's input (default ``backbone.preprocess``).
    """

    def __init__(self, backbone, table, todo: list[int], shard_size: int, batch_size: int, precision: str,
                 num_workers: int = 0, pin_memory: bool = False, outputs=None, transform=None):
        super().__init__()
        self.pin = bool(pin_memory)
        self.model = backbone.model
        self.backbone = backbone
        self.outputs = outputs or pooled_embeddings
        self.transform = transform or backbone.preprocess
        self.table, self.todo = table, list(todo)
        self.S, self.B, self.precision_name, self.nw = int(shard_size), int(batch_size), precision, int(num_workers)

    def setup(self, stage: str):
        # every rank works from rank 0's list of unfinished shards
        self.todo = self.trainer.strategy.broadcast(self.todo, src=0)

    def my_shards(self) -> list[int]:
        return self.todo[self.trainer.global_rank::self.trainer.world_size]

    def predict_dataloader(self):
        from ssl_pipeline.data.images import TableImages, collate_skipping

        ds = TableImages(self.table, np.arange(len(self.table)), self.transform)
        return torch.utils.data.DataLoader(ds, batch_sampler=ShardBatches(self.my_shards(), len(self.table), self.S,
                                                                          self.B),
                                           collate_fn=collate_skipping, num_workers=self.nw,
                                           pin_memory=self.pin and self.device.type == "cuda",
                                           prefetch_factor=4 if self.nw > 0 else None)

    def predict_step(self, batch, batch_idx):
        from ssl_pipeline.stages.encode import autocast_dtype

        images, rows, skipped = batch
        out = {}
        if images is not None:
            x = images.to(memory_format=torch.channels_last)
            dt = autocast_dtype(self.precision_name, x.device)
            with torch.no_grad(), torch.autocast(x.device.type, dtype=dt, enabled=dt is not None):
                out = self.outputs(self.model, x)
            out = {k: v.float().to(torch.float16).cpu().numpy() for k, v in out.items()}
        return {"arrays": out, "rows": rows.cpu().numpy(), "skipped": skipped}


class ShardWriter(BasePredictionWriter):
    """Writes each finished encode shard of this rank: ``<name>_`` per output, ``skip_``, then ``rows_`` (the
    completion mark). ``empty``: {name: shape of one row}: written (0 rows) for a shard with no readable image;
    outputs not named there are left out of such a shard."""

    def __init__(self, shard_dir: Path, n_rows: int, shard_size: int, empty: dict[str, tuple] | None = None):
        super().__init__(write_interval="batch")
        self.dir, self.N, self.S, self.empty = Path(shard_dir), n_rows, shard_size, dict(empty or {})
        self.acc: dict[int, dict] = {}
        self.n_written = 0
        self.n_images = 0
        self.n_total = 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        rows, skipped = prediction["rows"], prediction["skipped"]
        if not len(rows) and not skipped:  # the empty batch of a rank without shards
            return
        first = int(rows[0]) if len(rows) else int(skipped[0][0])
        s = first // self.S
        a = self.acc.setdefault(s, {"arrays": {}, "rows": [], "skipped": [], "seen": 0})
        for k, v in prediction["arrays"].items():
            a["arrays"].setdefault(k, []).append(v)
        a["rows"].append(rows)
        a["skipped"].extend([[int(r), str(e)] for r, e in skipped])
        a["seen"] += len(rows) + len(skipped)
        self.n_images += len(rows)
        for row, reason in skipped:
            log.warning("skipping unreadable image %s (%s)", pl_module.table.paths[row] or pl_module.table.ids[row],
                        reason)
        if a["seen"] == min(self.N, (s + 1) * self.S) - s * self.S:
            import json

            arrays = {k: np.concatenate(v) for k, v in a["arrays"].items()}
            for k, shape in self.empty.items():
                arrays.setdefault(k, np.zeros((0, *shape), np.float16))
            for k, v in arrays.items():
                atomic_save_npy(self.dir / f"{k}_{s:05d}.npy", v)
            atomic_write_text(self.dir / f"skip_{s:05d}.json", json.dumps(a["skipped"]))
            atomic_save_npy(self.dir / f"rows_{s:05d}.npy", np.concatenate(a["rows"]).astype(np.int64))
            del self.acc[s]
            self.n_written += 1

    def on_predict_end(self, trainer, pl_module):
        total = trainer.strategy.reduce(torch.tensor(float(self.n_images)), reduce_op="sum")
        self.n_total = int(total.item())
        trainer.strategy.barrier("shards written")


def encode_trainer_args(cfg: DictConfig) -> dict:
    """Trainer arguments of the encode stage: ``cfg.trainer`` when it asks for several processes, else one
    device chosen by ``encode.device`` (auto: CUDA when present). Precision is ``encode.precision``'s
    autocast inside the step, so the Trainer itself runs 32-true."""
    from ssl_pipeline.stages.encode import pick_device

    tcfg = cfg.get("trainer")
    if wants_ddp(tcfg):
        return {"precision": "32-true"}
    dev = pick_device(str(cfg.encode.get("device", "auto")))
    return {"accelerator": "gpu" if dev.type == "cuda" else "cpu", "devices": 1, "strategy": "auto",
            "precision": "32-true"}


def encode_shards(table, cfg: DictConfig, shard_dir: Path, todo: list[int], backbone=None, outputs=None,
                  transform=None, empty: dict[str, tuple] | None = None) -> tuple[int, float, int]:
    """Encode the shards ``todo`` of ``table`` into ``shard_dir`` with ``Trainer.predict``: the one shard loop.

    One process (``encode.device``) or, with ``trainer=ddp trainer.devices=N``, N processes that
    share the shards. The files are the same either way (same batches, same bytes). ``outputs``,
    ``transform``: see :class:`EncodeModule` (default: pooled embeddings ``emb_``, always written,
    with ``empty``); multi-label encoding passes its token extractor. Returns
    (images encoded over all ranks, seconds, world size). Meant to be called inside a
    :class:`DDPSection` (re-launched workers exit when it closes).
    """
    from ssl_pipeline.backbones import load_backbone

    ecfg = cfg.encode
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    if backbone is None:
        backbone = load_backbone(cfg.backbone, device="cpu")
    # channels-last speeds convolutions on CPU and GPU alike (measured 2-4x for EfficientNet on CPU)
    backbone.model.to(memory_format=torch.channels_last)
    if outputs is None:
        empty = {"emb": (backbone.embed_dim,)}
    writer = ShardWriter(shard_dir, len(table), int(ecfg.shard_size), empty)
    trainer = make_trainer(cfg.get("trainer"), logger=False, callbacks=[writer], inference_mode=True,
                           **encode_trainer_args(cfg))
    module = EncodeModule(backbone, table, todo, int(ecfg.shard_size), int(ecfg.batch_size), str(ecfg.precision),
                          int(ecfg.num_workers), pin_memory=bool(ecfg.get("pin_memory", False)), outputs=outputs,
                          transform=transform)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*custom batch sampler.*")  # ShardBatches returns every row
        trainer.predict(module, return_predictions=False)
    return writer.n_total, time.perf_counter() - t0, int(trainer.world_size)


def main(argv: list[str] | None = None) -> None:
    """``python -m ssl_pipeline.stages.predict_writer --out DIR [--conf DIR] OVERRIDES``: encode every row."""
    import argparse

    from hydra import compose, initialize_config_dir

    from ssl_pipeline.data.sources import build_table

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--conf", default=None, help="config folder (default: the package's own, see config_dir)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if a.conf is None:
        from ssl_pipeline.__main__ import config_dir

        a.conf = config_dir()
    with initialize_config_dir(config_dir=a.conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=a.overrides)
    table = build_table(cfg.data)
    S = int(cfg.encode.shard_size)
    shard_dir = Path(a.out) / "shards"
    todo = [s for s in range(math.ceil(len(table) / S)) if not (shard_dir / f"rows_{s:05d}.npy").exists()]
    with DDPSection():
        n, sec, _ = encode_shards(table, cfg, shard_dir, todo)
    print(f"encoded {n} images into {shard_dir} in {sec:.1f}s", flush=True)


if __name__ == "__main__":
    main()
