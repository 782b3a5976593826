"""Write a deployable model folder: safetensors weights + ``model.json``; no pickle anywhere.

Folder layout (``<run dir>/model/``)::

    model.json          format, task, backbone config, input size and preprocessing, class names,
                        head spec, per-class thresholds (multi-label), the run's metrics, file digests
    head.safetensors    the head's tensors (``head.*``) and, when the head standardises its inputs,
                        ``feature_mean`` / ``feature_std`` (D,)
    tower.safetensors   the image tower's state (``backbone.model.visual``), only when it was trained
                        (``retrain.mode=finetune``) or has no loadable source (``backbone.pretrained: null``);
                        otherwise the tower is rebuilt from ``model.json``'s backbone config

The folder is written into ``<run dir>/.model.tmp-<pid>/`` and renamed into place, so a reader
never sees half a model. :func:`ssl_pipeline.model.load.load_model` reads it back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import write_json

log = logging.getLogger(__name__)

FORMAT = "ssl_pipeline.model/1"
MODEL_JSON = "model.json"
HEAD_FILE = "head.safetensors"
TOWER_FILE = "tower.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(metrics: dict | None) -> dict:
    """JSON-safe copy of a flat metrics dict (numbers, strings, booleans, None)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, (np.integer, np.floating)):
            v = v.item()
        if isinstance(v, float) and not np.isfinite(v):
            v = None
        if v is None or isinstance(v, (int, float, str, bool)):
            out[str(k)] = v
    return out


def describe_preprocess(preprocess) -> dict:
    """What a torchvision eval transform does, as JSON: resize, crop, interpolation, mean, std.

    ``preprocess``: the backbone's eval transform (``Backbone.preprocess``), PIL image -> (3, S, S).
    """
    from torchvision import transforms as T

    d: dict = {"steps": []}
    for t in getattr(preprocess, "transforms", [preprocess]):
        name = type(t).__name__
        d["steps"].append(name)
        if isinstance(t, T.Resize):
            size = t.size
            d["resize"] = list(size) if isinstance(size, (tuple, list)) else int(size)
            d["interpolation"] = str(getattr(t.interpolation, "value", t.interpolation))
        elif isinstance(t, T.CenterCrop):
            d["crop"] = [int(s) for s in t.size]
        elif isinstance(t, T.Normalize):
            d["mean"] = [float(x) for x in t.mean]
            d["std"] = [float(x) for x in t.std]
    return d


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def export_model(out_dir: str | os.PathLike, *, classes: list[str], head_state: dict[str, torch.Tensor],
                 head: dict, backbone_cfg: dict | None, preprocess=None, image_size: int | None = None,
                 tower_state: dict[str, torch.Tensor] | None = None, multilabel: bool = False,
                 thresholds: np.ndarray | list[float] | None = None, metrics: dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write the model folder ``out_dir`` atomically; return it.

    Parameters
    ----------
    classes : C class names, index = output column.
    head_state : the head's tensors, keyed ``head.*`` (as in ``make_head``'s Sequential), plus
        ``feature_mean`` / ``feature_std`` (D,) when ``head["standardize"]``.
    head : ``{"kind": linear|mlp|cosine, "in_dim": D, "hidden": h, "standardize": bool,
        "embedding_dtype": "float16"|"float32"}``: how to rebuild it (``embedding_dtype``: the
        precision of the embeddings the head was trained on; inputs are rounded to it).
    backbone_cfg : the ``backbone`` config group (rebuilt by ``load_backbone``), or None for a
        model over precomputed embeddings (``data=embeddings``: it takes (B, D) inputs only).
    preprocess : the backbone's eval transform (recorded in the JSON, checked at load).
    tower_state : ``visual.state_dict()`` when the tower differs from its source.
    thresholds : (C,) per-class decision thresholds on probabilities (multi-label only).
    extra : more JSON fields (``preprocessing`` additions such as ``pre_shrink``).
    """
    out_dir = Path(out_dir)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _save_tensors(tmp / HEAD_FILE, head_state)
        files = [HEAD_FILE]
        if tower_state is not None:
            _save_tensors(tmp / TOWER_FILE, tower_state)
            files.append(TOWER_FILE)
        if multilabel:
            if thresholds is None or len(thresholds) != len(classes):
                raise ValueError(f"a multi-label model needs {len(classes)} per-class thresholds")
            thresholds = [float(t) for t in np.asarray(thresholds, np.float64)]
        bcfg = dict(backbone_cfg) if backbone_cfg is not None else None
        pre = describe_preprocess(preprocess) if preprocess is not None else None
        if pre is not None and extra and extra.get("preprocessing"):
            pre.update(extra["preprocessing"])
        doc = {
            "format": FORMAT,
            "task": "multilabel" if multilabel else "single_label",
            "input": "images" if bcfg is not None else "embeddings",
            "backbone": bcfg,
            "backbone_name": bcfg.get("name") if bcfg else None,
            "pretrained": bcfg.get("pretrained") if bcfg else None,
            "input_size": int(image_size) if image_size else None,
            "preprocessing": pre,
            "classes": [str(c) for c in classes],
            "head": dict(head),
            "tower": "tower.safetensors" if tower_state is not None else "pretrained source (backbone config)",
            "thresholds": thresholds if multilabel else None,
            "metrics": _plain(metrics),
            "files": {f: _sha256(tmp / f) for f in files},
        }
        for k, v in (extra or {}).items():
            if k != "preprocessing":
                doc[k] = v
        write_json(tmp / MODEL_JSON, doc)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # a model is meant to be shared (temp files are created owner-only)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model: exported to %s (%s)", out_dir, ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return out_dir


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def export_retrain(cfg: DictConfig, table, stage_dir: Path, run_dir: Path, metrics: dict) -> Path | None:
    """Export the semi-supervised model of a (single-label) retrain artifact into ``<run_dir>/model/``.

    ``stage_dir``: the retrain artifact (``head.pt`` in head mode, ``model.pt`` in finetune mode:
    state dicts of plain tensors, read with ``weights_only=True``). Only rank 0 writes.
    """
    if _rank() != 0:
        return None
    stage_dir, run_dir = Path(stage_dir), Path(run_dir)
    rcfg = cfg.retrain
    mode = str(rcfg.get("mode", "head"))
    embeddings_only = cfg.data.kind == "embeddings"
    bcfg = None if embeddings_only else OmegaConf.to_container(cfg.backbone, resolve=True)
    spec = {"kind": str(rcfg.get("head", "linear")), "hidden": int(rcfg.get("hidden", 512))}
    tower, pre, size, extra = None, None, None, {"mode": mode}
    if mode == "head":
        sd = torch.load(stage_dir / "head.pt", map_location="cpu", weights_only=True)
        head_state = {k: v for k, v in sd.items() if k.startswith("head.")}
        standardize = bool(rcfg.get("standardize", True))
        if standardize:
            head_state["feature_mean"], head_state["feature_std"] = sd["feature_mean"], sd["feature_std"]
        spec.update(in_dim=int(sd["feature_mean"].shape[0]), standardize=standardize,
                    embedding_dtype="float16")  # the encode stage stores float16 embeddings
    else:
        sd = torch.load(stage_dir / "model.pt", map_location="cpu", weights_only=True)
        head_state = {k: v for k, v in sd.items() if k.startswith("head.")}
        tower = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        spec.update(standardize=False, embedding_dtype="float32")
    if bcfg is not None:
        from ssl_pipeline.backbones import load_backbone

        backbone = load_backbone(cfg.backbone, device="cpu")
        pre, size = backbone.preprocess, backbone.image_size
        spec.setdefault("in_dim", backbone.embed_dim)
        if tower is None and bcfg.get("pretrained") in (None, "", "none"):
            # a random init has no source to rebuild from: keep its weights
            tower = backbone.model.visual.state_dict()
        if mode == "finetune":  # retrain decodes with RowImages: sides above 2 S are first shrunk (PIL, bicubic)
            extra["preprocessing"] = {"pre_shrink_min_side": 2 * int(size)}
    return export_model(run_dir / "model", classes=list(table.classes), head_state=head_state, head=spec,
                        backbone_cfg=bcfg, preprocess=pre, image_size=size, tower_state=tower, metrics=metrics,
                        extra=extra)
