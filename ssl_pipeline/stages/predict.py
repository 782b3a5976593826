"""``stage=predict``: apply an exported model to a folder of images.

``python -m ssl_pipeline stage=predict predict.model=RUN/model predict.images=FOLDER`` searches
``FOLDER`` recursively for images and writes into the run directory:

* ``predictions.csv`` - ``path, label, confidence, p_<class>...`` (one probability column per
  class; ``label`` is the class name, or for multi-label the ``|``-joined classes at or above
  their exported thresholds);
* ``skipped.csv`` - ``path, reason`` of every file that could not be read (not in predictions.csv);
* ``metrics.json`` - ``predict/n_images``, ``predict/n_skipped``, ``predict/images_per_s`` and, when
  the images sit in folders named after the model's classes, ``predict/accuracy`` (single-label).

Inference runs with Lightning ``Trainer.predict`` on ``cfg.trainer`` (``trainer=gpu``,
``trainer=ddp``...) through :func:`~ssl_pipeline.stages.predict_writer.predict_arrays`; none of
the data/encode stages run.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import atomic_write_text, write_json
from ssl_pipeline.data.sources import IMAGE_EXTENSIONS
from ssl_pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def find_images(folder: Path) -> list[Path]:
    """Image files (by extension) under ``folder``, recursively, sorted; hidden files and folders left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def settings(cfg: DictConfig) -> tuple[Path, Path, int, int]:
    """(model folder, images folder, batch size, workers) from ``cfg.predict``; ConfigError names the bad key."""
    p = cfg.get("predict") or {}
    model, images = p.get("model"), p.get("images")
    if not model:
        raise ConfigError("predict.model", "set predict.model=<run dir>/model (a folder written by a retrain)")
    if not images:
        raise ConfigError("predict.images", "set predict.images=<folder of images> (searched recursively)")
    model, images = Path(str(model)).expanduser(), Path(str(images)).expanduser()
    if not model.is_dir():
        raise ConfigError("predict.model", f"folder {str(model)!r} does not exist")
    if not (model / "model.json").is_file():
        raise ConfigError("predict.model", f"{str(model)!r} holds no model.json; point it at a run's model/ folder")
    if not images.is_dir():
        raise ConfigError("predict.images", f"folder {str(images)!r} does not exist")
    bs, nw = int(p.get("batch_size", 64)), int(p.get("num_workers", 0))
    if bs < 1:
        raise ConfigError("predict.batch_size", f"must be >= 1, got {bs}")
    if nw < 0:
        raise ConfigError("predict.num_workers", f"must be >= 0, got {nw}")
    return model, images, bs, nw


class FileImages:
    """``(index, (3, S, S) tensor or None)`` of image files through ``transform``; None = unreadable."""

    def __init__(self, paths: list[Path], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ssl_pipeline.data.images import open_image

        try:
            return i, self.transform(open_image(str(self.paths[i])))
        except Exception:  # noqa: BLE001 - any decoding failure skips the file; the reason is read again later
            return i, None


def _collate(batch):
    import torch

    idx = torch.tensor([i for i, _ in batch], dtype=torch.long)
    ok = torch.tensor([x is not None for _, x in batch])
    images = torch.stack([x for _, x in batch if x is not None]) if ok.any() else None
    return idx, ok, images


def _reason(path: Path) -> str:
    from ssl_pipeline.data.images import open_image

    try:
        open_image(str(path))
        return "could not be preprocessed"
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"


def predict_folder(model, paths: list[Path], tcfg, out_dir: Path, batch_size: int = 64, num_workers: int = 0):
    """Probabilities (n, C) float32 (NaN rows for unreadable files) and a readable mask (n,) bool."""
    import os

    import torch
    from tqdm.auto import tqdm

    from ssl_pipeline.stages.predict_writer import predict_arrays

    C = len(model.classes)
    bar = tqdm(total=len(paths), desc="predict", unit="img", mininterval=2.0, dynamic_ncols=True,
               disable=int(os.environ.get("LOCAL_RANK", "0")) > 0)

    def fn(net, batch):
        idx, ok, images = batch
        ok = ok.cpu()
        probs = torch.full((len(idx), C), float("nan"))
        if images is not None:
            probs[ok] = net.probabilities(net(images)).float().cpu()
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        bar.update(len(idx) * (torch.distributed.get_world_size() if dist else 1))  # rank 0 stands for all
        return {"idx": idx.cpu(), "ok": ok, "probs": probs}

    out = predict_arrays(model, FileImages(paths, model.transform), fn, out_dir, tcfg, batch_size=batch_size,
                         collate_fn=_collate, num_workers=num_workers)
    bar.close()
    return out["probs"].numpy(), out["ok"].numpy().astype(bool)


def write_predictions(path: Path, paths: list[Path], probs: np.ndarray, labels: list[str], conf: np.ndarray,
                      classes: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "confidence", *[f"p_{c}" for c in classes]])
    for p, lab, c, row in zip(paths, labels, conf, probs):
        w.writerow([str(p), lab, f"{float(c):.6f}", *[f"{float(x):.6f}" for x in row]])
    atomic_write_text(path, buf.getvalue())


def run(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Predict every image under ``predict.images`` with the model in ``predict.model``; return the metrics."""
    import shutil

    import torch

    from ssl_pipeline.model.load import load_model
    from ssl_pipeline.pipeline import quiet_lightning
    from ssl_pipeline.stages.predict_writer import DDPSection

    model_dir, folder, bs, nw = settings(cfg)
    quiet_lightning()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        model = load_model(model_dir)
    except DataError as e:
        raise ConfigError("predict.model", str(e)) from e
    if model.transform is None:
        raise ConfigError("predict.model", "this model was trained on precomputed embeddings (data=embeddings); "
                                           "it has no image tower to predict images with")
    paths = find_images(folder)
    if not paths:
        raise ConfigError("predict.images", f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
    log.info("predict: %d images under %s with %s (%d classes)", len(paths), folder, model_dir, len(model.classes))
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else None
    t0 = time.perf_counter()
    with DDPSection():  # workers re-launched for a multi-device predict exit at its end
        probs, ok = predict_folder(model, paths, tcfg, run_dir / "predict_tmp", bs, nw)
    seconds = time.perf_counter() - t0
    shutil.rmtree(run_dir / "predict_tmp", ignore_errors=True)
    good = [p for p, k in zip(paths, ok) if k]
    bad = [p for p, k in zip(paths, ok) if not k]
    P = probs[ok]
    labels, conf = model.decide(torch.from_numpy(P))
    write_predictions(run_dir / "predictions.csv", good, P, labels, conf.numpy(), model.classes)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "reason"])
    for p in bad:
        reason = _reason(p)
        log.warning("predict: skipping unreadable image %s (%s)", p, reason)
        w.writerow([str(p), reason])
    atomic_write_text(run_dir / "skipped.csv", buf.getvalue())
    metrics = {"predict/n_images": len(good), "predict/n_skipped": len(bad),
               "predict/images_per_s": round(len(paths) / seconds, 2) if seconds > 0 else 0.0,
               "predict/seconds": round(seconds, 2)}
    if not model.multilabel:
        known = [i for i, p in enumerate(good) if p.parent.name in model.classes]
        if known:
            truth = [good[i].parent.name for i in known]
            metrics["predict/accuracy"] = float(np.mean([labels[i] == t for i, t in zip(known, truth)]))
            metrics["predict/n_with_class_folder"] = len(known)
    write_json(run_dir / "metrics.json", metrics)
    OmegaConf.save(cfg, run_dir / "config_resolved.yaml", resolve=True)
    lines = [f"  {k:<40s} {v:.4f}" if isinstance(v, float) else f"  {k:<40s} {v}" for k, v in metrics.items()]
    print("\nssl_pipeline predict\n" + "\n".join(lines) + f"\n  predictions: {run_dir / 'predictions.csv'}\n"
          f"  skipped:     {run_dir / 'skipped.csv'}\n", flush=True)
    return metrics
