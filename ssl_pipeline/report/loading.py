"""Loading a finished run: :class:`RunArtifacts` from a run directory or from stage folders."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.labeling.knn import KNNGraph

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class RunArtifacts:
    """What a run left behind, aligned on its training points (the cluster stage's ``rows.npy``).

    Every per-point array has one entry per training point with an embedding,
    in the order of ``rows``; an array is None when the stage that writes it did
    not run (or the labeler does not provide it).

    Attributes
    ----------
    run_dir : Path or None
    metrics : dict
        Flat ``<stage>/<name>`` metrics (``metrics.json``).
    artifacts : dict[str, Path]
        Stage name -> artifact folder (``artifacts.json``).
    cfg : DictConfig or None
        The resolved run config (``config_resolved.yaml``).
    table : SampleTable or None
        The sample table (rebuilt from ``cfg.data``), for images and ground truth.
    classes : list[str]
    rows : (N,) int64
        Table rows of the training points.
    embeddings : (N, D) float32 or None
    clusters : (N,) int64 or None
    labels, confidence, tier, noise, agreement, labeled : (N,) arrays or None
        The pseudolabel artifact (labeled rows keep their given labels).
    y_true : (N,) int64 (-1 = unknown), (N, C) for multi-label tables, or None
    knn : KNNGraph or None
        Positions (into ``rows``) of each point's nearest neighbours.
    pseudolabels : list[dict]
        The rows of ``pseudolabels.csv`` (unlabeled training samples).
    labeler : dict
        ``labeler.json`` of the pseudolabel artifact (name, class, params).
    notes : list[str]
        Things that could not be loaded and why.
    """

    run_dir: Path | None
    metrics: dict
    artifacts: dict[str, Path]
    cfg: object | None
    table: SampleTable | None
    classes: list[str]
    rows: NDArray[np.int64]
    embeddings: NDArray[np.float32] | None = None
    clusters: NDArray[np.int64] | None = None
    labels: NDArray | None = None
    confidence: NDArray | None = None
    tier: NDArray[np.int64] | None = None
    noise: NDArray[np.bool_] | None = None
    agreement: NDArray | None = None
    labeled: NDArray[np.bool_] | None = None
    y_true: NDArray | None = None
    knn: KNNGraph | None = None
    pseudolabels: list[dict] = field(default_factory=list)
    labeler: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def multilabel(self) -> bool:
        return bool(self.table is not None and self.table.multilabel) or (
            self.labels is not None and self.labels.ndim != 1)

    @property
    def single_label(self) -> bool:
        """Pseudo-labels exist and are one class id per point."""
        return self.labels is not None and self.labels.ndim == 1 and not self.multilabel

    @property
    def unlabeled(self) -> NDArray[np.bool_]:
        """(N,) the points that were pseudo-labeled (all points when no labeled mask is known)."""
        return ~self.labeled if self.labeled is not None else np.ones(len(self), bool)

    @property
    def known(self) -> NDArray[np.bool_]:
        """(N,) unlabeled points whose ground truth is known (single-label runs)."""
        if not self.single_label or self.y_true is None or self.y_true.ndim != 1:
            return np.zeros(len(self), bool)
        return self.unlabeled & (self.y_true >= 0)

    @property
    def has_truth(self) -> bool:
        return bool(self.known.any())

    @property
    def correct(self) -> NDArray[np.int8]:
        """(N,) 1 = pseudo-label right, 0 = wrong, -1 = labeled point or truth unknown."""
        out = np.full(len(self), -1, np.int8)
        k = self.known
        if k.any():
            out[k] = (self.labels[k] == self.y_true[k]).astype(np.int8)
        return out

    @property
    def has_images(self) -> bool:
        t = self.table
        return t is not None and (t.load_image is not None or any(p is not None for p in t.paths))

    def class_name(self, c: int) -> str:
        return self.classes[c] if 0 <= c < len(self.classes) else "-"

    def image(self, pos: int, size: int = 64):
        """The image of training point ``pos`` as an RGB PIL image fitted in ``size`` x ``size``, or None."""
        from PIL import Image, ImageOps

        if self.table is None:
            return None
        r = int(self.rows[pos])
        try:
            if self.table.load_image is not None:
                im = self.table.load_image(r)
            elif self.table.paths[r]:
                im = Image.open(self.table.paths[r])
                im.draft("RGB", (2 * size, 2 * size))  # JPEG: decode at reduced scale, much faster
            else:
                return None
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(im, mask=im.getchannel("A"))
                im = bg
            im = im.convert("RGB")
            method = Image.Resampling.NEAREST if max(im.size) * 2 <= size else Image.Resampling.BILINEAR
            return ImageOps.contain(im, (size, size), method=method)
        except Exception as e:  # noqa: BLE001 - a thumbnail that cannot be drawn becomes a blank cell
            log.debug("thumbnail of row %d failed: %s", r, e)
            return None


def _npy(folder: Path | None, name: str) -> np.ndarray | None:
    if folder is None:
        return None
    f = Path(folder) / name
    return np.load(f) if f.exists() else None


def read_json(path: Path) -> dict:
    """A JSON file as a dict (empty when the file is absent)."""
    return json.loads(path.read_text()) if path.exists() else {}


def read_pseudolabels(path: Path) -> list[dict]:
    """The rows of a ``pseudolabels.csv`` (empty list when the file is absent)."""
    if not Path(path).exists():
        return []
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def from_artifacts(artifacts: dict, table: SampleTable | None = None, cfg=None, metrics: dict | None = None,
                   run_dir: str | os.PathLike | None = None, pseudolabels: list[dict] | None = None,
                   embeddings: bool = True) -> RunArtifacts:
    """Assemble a :class:`RunArtifacts` from stage folders (``{stage: folder}``) and an optional table.

    ``embeddings=False`` skips loading the encode shards (the embedding map then
    does not apply).
    """
    from ssl_pipeline.stage_io import EmbeddingStore, load_graph

    arts = {k: Path(v) for k, v in (artifacts or {}).items()}
    enc, cl, pl = arts.get("encode"), arts.get("cluster"), arts.get("pseudolabel")
    notes: list[str] = []
    for stage, folder in arts.items():
        if not folder.is_dir():
            notes.append(f"{stage} artifact {folder} is missing (cache cleared?)")
    enc = enc if enc is not None and enc.is_dir() else None
    cl = cl if cl is not None and cl.is_dir() else None
    pl = pl if pl is not None and pl.is_dir() else None
    store = EmbeddingStore(enc) if enc is not None else None

    rows = _npy(cl, "rows.npy")
    if rows is None:
        rows = _npy(pl, "rows.npy")
    if rows is None and store is not None:
        rows = store.rows[table.train[store.rows]] if table is not None else store.rows
    rows = np.asarray(rows if rows is not None else np.zeros(0, np.int64), np.int64)

    pseudolabels = list(pseudolabels or [])
    labels = _npy(pl, "labels.npy")
    labeled = _as_bool(_npy(pl, "labeled.npy"))
    if table is not None and len(rows) and int(rows.max()) >= len(table):
        notes.append(f"the sample table has {len(table)} rows but the artifacts index row {int(rows.max())}: "
                     "the data changed since the run; images and ground truth are not shown")
        table = None
    if table is not None and labeled is not None and pseudolabels:
        ids = [table.ids[int(r)] for r in rows[~labeled]]
        if ids != [p["id"] for p in pseudolabels]:
            notes.append("the sample table's ids differ from pseudolabels.csv: the data changed since the run; "
                         "images are not shown and ground truth comes from pseudolabels.csv")
            table = None

    if labeled is None and table is not None and not table.multilabel and len(rows):
        labeled = np.asarray(table.labeled)[rows]
    classes = list(table.classes) if table is not None else _classes_from_csv(pseudolabels, labels)

    y_true = None
    if table is not None and len(rows):
        y_true = np.asarray(table.y_true)[rows]
    elif labels is not None and labeled is not None and labels.ndim == 1 and len(pseudolabels) == (~labeled).sum():
        # no table: truth of the unlabeled rows from the audit export, labeled rows keep their given labels
        index = {c: i for i, c in enumerate(classes)}
        y_true = np.where(labeled, labels, -1).astype(np.int64)
        y_true[np.flatnonzero(~labeled)] = [index.get(p.get("true_label", ""), -1) for p in pseudolabels]

    X = None
    if embeddings and store is not None and len(rows):
        pos = np.searchsorted(store.rows, rows)
        if (pos < len(store.rows)).all() and np.array_equal(store.rows[np.minimum(pos, len(store.rows) - 1)], rows):
            X = np.asarray(store.matrix()[pos], np.float32)
        else:
            notes.append("the encode artifact lacks some training rows; the embedding map is not shown")

    knn = load_graph(cl) if cl is not None and (cl / "knn_idx.npy").exists() else None
    return RunArtifacts(
        run_dir=Path(run_dir) if run_dir is not None else None, metrics=dict(metrics or {}), artifacts=arts, cfg=cfg,
        table=table, classes=classes, rows=rows, embeddings=X, clusters=_npy(cl, "clusters.npy"), labels=labels,
        confidence=_npy(pl, "confidence.npy"), tier=_npy(pl, "tier.npy"), noise=_as_bool(_npy(pl, "noise.npy")),
        agreement=_npy(pl, "agreement.npy"), labeled=_as_bool(labeled), y_true=y_true, knn=knn,
        pseudolabels=pseudolabels, labeler=read_json(pl / "labeler.json") if pl is not None else {}, notes=notes)


def _as_bool(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a).astype(bool)


def _classes_from_csv(pseudolabels: list[dict], labels: np.ndarray | None) -> list[str]:
    names: dict[int, str] = {}
    for p in pseudolabels:
        try:
            names.setdefault(int(p["label_id"]), p["label"])
        except (KeyError, ValueError):
            continue
    n = max([*names, int(labels.max()) if labels is not None and labels.size else -1]) + 1
    return [names.get(i, str(i)) for i in range(n)]


def load_run(run_dir: str | os.PathLike, embeddings: bool = True, table: SampleTable | None = None) -> RunArtifacts:
    """Load a run directory (``metrics.json``, ``artifacts.json``, ``config_resolved.yaml``, ``pseudolabels.csv``).

    The sample table is rebuilt from the saved config with
    :func:`ssl_pipeline.data.sources.build_table` unless ``table`` is given; when
    that fails (data moved) the run still loads, without images.
    """
    from omegaconf import OmegaConf

    from ssl_pipeline.data.sources import build_table

    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "artifacts.json").exists():
        raise FileNotFoundError(f"{run_dir} is not a finished run directory: it has no artifacts.json "
                                "(run `python -m ssl_pipeline` first, or point at its Hydra run dir)")
    artifacts = read_json(run_dir / "artifacts.json")
    metrics = read_json(run_dir / "metrics.json")
    cfg = OmegaConf.load(run_dir / "config_resolved.yaml") if (run_dir / "config_resolved.yaml").exists() else None
    notes = []
    if table is None and cfg is not None:
        try:
            table = build_table(cfg.data)
        except Exception as e:  # noqa: BLE001 - the run is still worth inspecting without its images
            notes.append(f"could not rebuild the sample table ({type(e).__name__}: {e}); images are not shown")
    run = from_artifacts(artifacts, table=table, cfg=cfg, metrics=metrics, run_dir=run_dir,
                         pseudolabels=read_pseudolabels(run_dir / "pseudolabels.csv"), embeddings=embeddings)
    run.notes[:0] = notes
    for n in run.notes:
        log.warning("report: %s", n)
    return run


def latest_run(roots: Sequence[str | os.PathLike] | None = None) -> Path | None:
    """The newest run directory (by ``metrics.json`` time) under ``roots``.

    Default roots: ``outputs/`` in the working directory, in its parent (a
    notebook started in ``notebooks/``) and beside the package (source checkout).
    """
    if roots is None:
        here = Path.cwd()
        roots = [here / "outputs", here.parent / "outputs", Path(__file__).resolve().parent.parent / "outputs"]
    best, best_t = None, -1.0
    for root in dict.fromkeys(Path(r).resolve() for r in roots):
        if not root.is_dir():
            continue
        for m in root.rglob("metrics.json"):
            t = m.stat().st_mtime
            if t > best_t and (m.parent / "artifacts.json").exists():
                best, best_t = m.parent, t
    return best



def multilabel_decisions(run: RunArtifacts) -> list[dict]:
    """Rows of the run's ``pseudolabels_multilabel.csv`` (one per unlabeled image and label), or [] if absent."""
    if run.run_dir is None:
        return []
    path = Path(run.run_dir) / "pseudolabels_multilabel.csv"
    if not path.exists():
        return []
    cached = getattr(run, "_ml_rows", None)
    if cached is None:
        with open(path, newline="") as f:
            cached = list(csv.DictReader(f))
        object.__setattr__(run, "_ml_rows", cached)
    return cached

