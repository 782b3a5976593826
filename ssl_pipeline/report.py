"""Views of a finished run: embedding maps, cluster thumbnails, per-class quality, tiers, calibration.

Everything here reads artifacts only (the run directory and the stage
folders named in its ``artifacts.json``) and reuses the package's loaders; it
holds no labeling logic of its own. Figures are plain
:class:`matplotlib.figure.Figure` objects, not pyplot-managed ones, so building
many of them in the report stage leaks nothing and needs no GUI backend; tables
are lists of dicts (no pandas).

Typical use (the notebook ``notebooks/inspect_clusters.ipynb`` does this)::

    from ssl_pipeline import report
    run = report.load_run("outputs/2024-01-01/12-00-00")
    emap = report.embedding_map(run)             # t-SNE of a seeded subsample
    report.plot_map(run, emap, color_by="cluster")
    report.plot_cluster_thumbnails(run)
    report.class_table(run)

Views that do not apply to a run (no pseudo-labels yet, no ground truth, no
images behind an embeddings file, a labeler without tiers or noise flags, a
multi-label run) are reported as skipped by :func:`missing`, keyed on what the
artifacts hold, instead of failing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray

from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.labeling.knn import KNNGraph

log = logging.getLogger(__name__)

GRAY = "#b0b0b0"
GREEN = "#2a9d4b"
RED = "#d1342f"


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
    from ssl_pipeline.stages.cluster import load_graph
    from ssl_pipeline.stages.encode import EmbeddingStore

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


# ------------------------------------------------------------------------------------------ applicability
REQUIREMENTS: dict[str, tuple[Callable[[RunArtifacts], bool], str]] = {
    "embeddings": (lambda r: r.embeddings is not None and len(r) > 0, "no embeddings (encode artifact missing)"),
    "clusters": (lambda r: r.clusters is not None, "no cluster assignments (the cluster stage did not run)"),
    "labels": (lambda r: r.single_label, "no single-label pseudo-labels (pseudolabel stage not run, or multi-label)"),
    "truth": (lambda r: r.has_truth, "no ground truth for the pseudo-labeled samples"),
    "images": (lambda r: r.has_images, "no images behind the samples (embeddings file, or data moved)"),
    "knn": (lambda r: r.knn is not None, "no kNN graph (the cluster stage did not run)"),
    "confidence": (lambda r: r.confidence is not None and r.confidence.ndim == 1, "no per-sample confidence"),
    "noise_flags": (lambda r: r.noise is not None and bool((r.noise & r.unlabeled).any()),
                    "the labeler flagged no sample as noise"),
    "tiers": (lambda r: has_tiers(r), "the labeler provides no tiers (one tier for every pseudo-label)"),
    "multilabel_decisions": (lambda r: bool(multilabel_decisions(r)),
                             "no multi-label pseudo-label decisions (single-label run, or no unlabeled images)"),
}


def has_tiers(run: RunArtifacts) -> bool:
    """True where the labeler sorted its pseudo-labels into more than one tier (e.g. HDL)."""
    if run.tier is None or not run.single_label:
        return False
    return "pseudolabel/n_tiers" in run.metrics or len(np.unique(run.tier[run.unlabeled])) > 1


def missing(run: RunArtifacts, needs: Sequence[str]) -> list[str]:
    """Reasons why a view needing ``needs`` (keys of :data:`REQUIREMENTS`) cannot be drawn; empty = it can."""
    return [REQUIREMENTS[n][1] for n in needs if not REQUIREMENTS[n][0](run)]


# ----------------------------------------------------------------------------------------- embedding map
class EmbeddingMap(NamedTuple):
    """2-D coordinates ``xy`` (M, 2) of the training points at positions ``pos`` (M,)."""

    pos: NDArray[np.int64]
    xy: NDArray[np.float32]
    method: str


def embedding_map(run: RunArtifacts, method: str = "tsne", max_points: int = 3000, seed: int = 0,
                  max_iter: int = 500, n_threads: int | None = 1) -> EmbeddingMap:
    """Project a seeded subsample of the training embeddings to 2-D.

    The subsample keeps the labeled points (up to a tenth of ``max_points``) and draws the rest at random
    (``numpy.random.default_rng(seed)``) up to ``max_points``; it is reduced to 50
    dimensions with PCA, then to 2 with scikit-learn's t-SNE (``method="tsne"``,
    ``max_iter`` iterations) or taken as the first two principal components
    (``method="pca"``). ``n_threads`` caps the OpenMP/BLAS threads of t-SNE
    (None = all): a few thousand points take seconds on one thread, and on a
    small or busy machine more threads made it 2x slower.
    """
    from sklearn.decomposition import PCA

    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    if run.embeddings is None or len(run) == 0:
        raise ValueError("this run has no embeddings to map")
    n = len(run)
    rng = np.random.default_rng(seed)
    if n <= max_points:
        pos = np.arange(n)
    else:
        keep = np.flatnonzero(run.labeled) if run.labeled is not None else np.zeros(0, np.int64)
        keep = np.sort(rng.permutation(keep)[: max_points // 10])
        rest = np.setdiff1d(np.arange(n), keep)
        pos = np.sort(np.concatenate([keep, rng.choice(rest, max_points - len(keep), replace=False)]))
    X = np.asarray(run.embeddings[pos], np.float32)
    m = len(X)
    if m < 3:
        xy = np.zeros((m, 2), np.float32)
        xy[:, 0] = np.arange(m)
        return EmbeddingMap(pos, xy, "pca")
    dims = min(50, X.shape[1], m)
    Z = PCA(n_components=dims, random_state=seed).fit_transform(X) if X.shape[1] > dims else X - X.mean(0)
    if method == "pca" or m < 6:
        xy = Z[:, :2] if Z.shape[1] >= 2 else np.c_[Z[:, 0], np.zeros(m)]
        return EmbeddingMap(pos, np.asarray(xy, np.float32), "pca")
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    tsne = TSNE(n_components=2, perplexity=float(min(30.0, (m - 1) / 3.0)), init="pca", learning_rate="auto",
                max_iter=max(250, int(max_iter)), random_state=seed)
    with threadpool_limits(limits=n_threads):
        xy = tsne.fit_transform(np.ascontiguousarray(Z, np.float32))
    return EmbeddingMap(pos, np.asarray(xy, np.float32), "tsne")


# -------------------------------------------------------------------------------------------- drawing aids
def _colors(n: int) -> np.ndarray:
    """``n`` distinguishable RGBA colours (tab10 / tab20, then a continuous map)."""
    from matplotlib import colormaps

    if n <= 10:
        return colormaps["tab10"](np.arange(max(n, 1)))
    if n <= 20:
        return colormaps["tab20"](np.arange(n))
    return colormaps["turbo"](np.linspace(0.05, 0.95, n))


def _categorical_scatter(ax, xy: np.ndarray, cats: np.ndarray, names: dict[int, str], annotate: bool) -> None:
    values = [c for c in np.unique(cats) if c >= 0]
    cols = _colors(len(values))
    if (cats < 0).any():
        sel = cats < 0
        ax.scatter(xy[sel, 0], xy[sel, 1], s=5, c=GRAY, lw=0, label=names.get(-1, "none"))
    for col, c in zip(cols, values):
        sel = cats == c
        ax.scatter(xy[sel, 0], xy[sel, 1], s=5, color=col, lw=0, label=names.get(int(c), str(c)))
        if annotate:
            cx, cy = np.median(xy[sel], axis=0)
            ax.text(cx, cy, names.get(int(c), str(c)), fontsize=8, weight="bold", ha="center", va="center",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": col, "alpha": 0.8})
    if len(values) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _map_axes(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(7.5, 6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig, ax


def plot_map(run: RunArtifacts, emap: EmbeddingMap, color_by: str = "cluster") -> Figure:
    """The embedding map coloured by ``cluster``, pseudo-``label`` or ``correct`` (right / wrong / labeled)."""
    pos, xy = emap.pos, emap.xy
    how = f"{emap.method.upper()} of {len(pos)} of {len(run)} training points"
    if color_by == "cluster":
        _require(run, ["clusters"])
        fig, ax = _map_axes(f"k-means clusters ({how})")
        cats = run.clusters[pos]
        _categorical_scatter(ax, xy, cats, {int(c): f"c{c}" for c in np.unique(cats)}, annotate=True)
        return fig
    if color_by == "label":
        _require(run, ["labels"])
        fig, ax = _map_axes(f"pseudo-labels, stars = given labels ({how})")
        cats = run.labels[pos]
        names = {i: c for i, c in enumerate(run.classes)}
        names[-1] = "no label"
        _categorical_scatter(ax, xy, cats, names, annotate=len(np.unique(cats)) > 20)
        if run.labeled is not None and run.labeled[pos].any():
            lab = np.flatnonzero(run.labeled[pos])
            values = [c for c in np.unique(cats) if c >= 0]  # the colour order of _categorical_scatter
            cols = _colors(len(values))[np.searchsorted(values, cats[lab])]
            ax.scatter(xy[lab, 0], xy[lab, 1], s=90, marker="*", c=cols, edgecolors="black", linewidths=0.6,
                       zorder=3)
        return fig
    if color_by == "correct":
        _require(run, ["labels", "truth"])
        corr = run.correct[pos]
        acc = float(corr[corr >= 0].mean()) if (corr >= 0).any() else float("nan")
        fig, ax = _map_axes(f"pseudo-label correctness, accuracy {acc:.3f} on the shown points ({how})")
        lab = run.labeled[pos] if run.labeled is not None else np.zeros(len(pos), bool)
        groups = [(~lab & (corr < 0), GRAY, 5, "truth unknown"), (corr == 1, GREEN, 5, "correct"),
                  (corr == 0, RED, 7, "wrong"), (lab, "black", 40, "given label")]
        for sel, col, s, name in groups:
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=s, color=col, lw=0, label=f"{name} ({int(sel.sum())})",
                           marker="*" if name == "given label" else "o", zorder=3 if name == "given label" else 2)
        ax.legend(markerscale=2, fontsize=8, loc="best")
        return fig
    raise ValueError(f"color_by must be 'cluster', 'label' or 'correct', got {color_by!r}")


def _require(run: RunArtifacts, needs: Sequence[str]) -> None:
    why = missing(run, needs)
    if why:
        raise ValueError("this view does not apply to the run: " + "; ".join(why))


def _mosaic(cells: list[list[tuple[object, str, str]]], row_labels: list[str], title: str, thumb: int = 64,
            caption_lines: int = 2, split_first: bool = False) -> Figure:
    """A grid of thumbnails drawn as one image: ``cells[r][c] = (PIL image or None, caption, caption colour)``.

    ``split_first`` leaves a wider gap after the first column (sample | its neighbours).
    """
    gap, cap = 6, 11 * caption_lines + 2
    extra = 3 * gap if split_first else 0
    n_rows = len(cells)
    n_cols = max((len(r) for r in cells), default=1)

    def x_of(j: int) -> int:
        return j * (thumb + gap) + (extra if j >= 1 else 0)

    W = n_cols * (thumb + gap) + extra
    H = max(n_rows, 1) * (thumb + cap + gap)
    canvas = np.full((H, W, 3), 255, np.uint8)
    for i, row in enumerate(cells):
        y0 = i * (thumb + cap + gap)
        for j, (im, _, _) in enumerate(row):
            x0 = x_of(j)
            if im is None:
                canvas[y0:y0 + thumb, x0:x0 + thumb] = 225
                continue
            a = np.asarray(im.convert("RGB"))
            h, w = a.shape[:2]
            oy, ox = y0 + (thumb - h) // 2, x0 + (thumb - w) // 2
            canvas[oy:oy + h, ox:ox + w] = a
    label_px = 150 if any(row_labels) else 0
    dpi = 100
    fig = Figure(figsize=((W + label_px) / dpi, (H + 30) / dpi), dpi=dpi)
    ax = fig.add_axes((label_px / (W + label_px), 0, W / (W + label_px), H / (H + 30)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for i, row in enumerate(cells):
        y0 = i * (thumb + cap + gap)
        for j, (_, text, col) in enumerate(row):
            ax.text(x_of(j) + thumb / 2, y0 + thumb + 1, text, ha="center", va="top", fontsize=6.5,
                    color=col, linespacing=1.0, clip_on=False)
        if i < len(row_labels) and row_labels[i]:
            ax.text(-8, y0 + thumb / 2, row_labels[i], ha="right", va="center", fontsize=7.5, clip_on=False)
    fig.suptitle(title, fontsize=10)
    return fig


def _short(s: str, n: int = 12) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------------------------------- cluster grid
def plot_cluster_thumbnails(run: RunArtifacts, n_clusters: int = 8, per_cluster: int = 10, seed: int = 0,
                            thumb: int = 64) -> Figure:
    """Sample images of the ``n_clusters`` largest clusters (one row each), with their pseudo-labels.

    A caption is red where the pseudo-label is wrong, bold black on given labels.
    """
    _require(run, ["clusters", "images"])
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(run.clusters, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")][:n_clusters]
    corr = run.correct if run.single_label else np.full(len(run), -1, np.int8)
    cells, row_labels = [], []
    for c in order:
        members = np.flatnonzero(run.clusters == c)
        pick = np.sort(rng.choice(members, min(per_cluster, len(members)), replace=False))
        row = []
        for p in pick:
            if run.single_label:
                text = _short(run.class_name(int(run.labels[p])))
                if run.labeled is not None and run.labeled[p]:
                    text += "\n(given)"
                elif corr[p] == 0:
                    text += f"\ntrue {_short(run.class_name(int(run.y_true[p])), 8)}"
                col = RED if corr[p] == 0 else "black"
            else:
                text, col = "", "black"
            row.append((run.image(int(p), thumb), text, col))
        cells.append(row)
        label = f"cluster {int(c)}  (n={len(members)})"
        if run.single_label:
            lab = run.labels[members]
            lab = lab[lab >= 0]
            if len(lab):
                top = np.bincount(lab).argmax()
                label += f"\nmost: {_short(run.class_name(int(top)), 14)} {np.mean(lab == top):.0%}"
            k = run.known[members]
            if k.any():
                label += f"\nacc {float((corr[members][k] == 1).mean()):.2f}"
        row_labels.append(label)
    return _mosaic(cells, row_labels, f"{len(order)} largest of {len(ids)} clusters, {per_cluster} random "
                                      "members each (red = wrong pseudo-label)", thumb=thumb)


# ------------------------------------------------------------------------------------ per-class quality
def class_table(run: RunArtifacts) -> list[dict]:
    """Per class: given labels, pseudo-labels assigned, and where truth is known precision, recall and coverage.

    Over the pseudo-labeled samples: ``precision`` = right / assigned (among
    those with truth), ``recall`` = right / samples truly of the class,
    ``coverage`` = share of the samples truly of the class that received any
    pseudo-label, ``mean_confidence`` of the pseudo-labels assigned to the class.
    """
    _require(run, ["labels"])
    unl, known = run.unlabeled, run.known
    labels, y = run.labels, run.y_true
    out = []
    for c, name in enumerate(run.classes):
        assigned = unl & (labels == c)
        row = {"class": name, "n_labeled": int((~unl & (labels == c)).sum()), "n_pseudo": int(assigned.sum()),
               "mean_confidence": float(run.confidence[assigned].mean())
               if run.confidence is not None and assigned.any() else None}
        if known.any():
            truly = known & (y == c)
            tp = int((truly & (labels == c)).sum())
            scored = int((known & (labels == c)).sum())
            row.update({"n_true": int(truly.sum()), "n_correct": tp,
                        "precision": tp / scored if scored else None,
                        "recall": tp / int(truly.sum()) if truly.any() else None,
                        "coverage": float((labels[truly] >= 0).mean()) if truly.any() else None})
        out.append(row)
    return out


def plot_class_quality(run: RunArtifacts, max_classes: int = 40) -> Figure:
    """Bar charts of per-class precision / recall / coverage (where truth is known) and pseudo-label counts.

    With more than ``max_classes`` classes only the ``max_classes`` of lowest
    precision (most pseudo-labels, without truth) are drawn; :func:`class_table` has them all.
    """
    rows = class_table(run)
    truth = bool(rows) and "precision" in rows[0]
    title = "per-class pseudo-label precision, recall and coverage" if truth else \
        "pseudo-labels per class (no ground truth)"
    if len(rows) > max_classes:
        key = (lambda r: 2.0 if r["precision"] is None else r["precision"]) if truth else (lambda r: -r["n_pseudo"])
        rows = sorted(rows, key=key)[:max_classes]
        title += f": the {max_classes} classes of {'lowest precision' if truth else 'most pseudo-labels'}"
    names = [_short(r["class"], 14) for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(min(16.0, max(7.0, 0.4 * len(rows) + 3)), 6.5 if truth else 3.5), layout="constrained")
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(2 if truth else 1, 1, sharex=True, squeeze=False)[:, 0]
    if truth:
        ax = axes[0]
        w = 0.27
        for k, (key, col) in enumerate((("precision", "#3b75af"), ("recall", "#ef8636"), ("coverage", "#8c8c8c"))):
            v = np.array([np.nan if r[key] is None else r[key] for r in rows], float)
            ax.bar(x + (k - 1) * w, v, w, label=key, color=col)
        ax.set_ylim(0, 1.05)
        ax.axhline(run.metrics.get("pseudolabel/accuracy", np.nan), color="black", lw=0.8, ls="--",
                   label="overall accuracy")
        ax.legend(fontsize=7, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax = axes[-1]
    ax.bar(x - 0.2, [r["n_pseudo"] for r in rows], 0.4, label="pseudo-labels assigned", color="#3b75af")
    if truth:
        ax.bar(x + 0.2, [r["n_true"] for r in rows], 0.4, label="truly of the class", color="#bbbbbb")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    tilt = sum(len(n) for n in names) > 60
    ax.set_xticks(x, names, rotation=45 if tilt else 0, ha="right" if tilt else "center", fontsize=8)
    return fig


# --------------------------------------------------------------------------------------- neighbours
def select_samples(run: RunArtifacts, which: str = "least_confident", n: int = 6) -> NDArray[np.int64]:
    """Positions of ``n`` pseudo-labeled points: the ``least_confident`` ones or the ``noise``-flagged ones."""
    unl = run.unlabeled & (run.labels >= 0)
    conf = run.confidence if run.confidence is not None else np.zeros(len(run))
    if which == "least_confident":
        cand = np.flatnonzero(unl)
    elif which == "noise":
        cand = np.flatnonzero(unl & run.noise) if run.noise is not None else np.zeros(0, np.int64)
    else:
        raise ValueError(f"which must be 'least_confident' or 'noise', got {which!r}")
    return cand[np.argsort(conf[cand], kind="stable")][:n]


def neighbour_table(run: RunArtifacts, which: str = "least_confident", n: int = 6, k: int = 5) -> list[dict]:
    """One dict per selected sample: id, pseudo-label, confidence, truth, and its ``k`` nearest neighbours."""
    _require(run, ["labels", "knn"])
    out = []
    for p in select_samples(run, which, n):
        nb = [(int(q), float(s)) for q, s in zip(run.knn.idx[p], run.knn.sim[p]) if q >= 0][:k]
        out.append({
            "pos": int(p), "id": run.table.ids[int(run.rows[p])] if run.table is not None else str(run.rows[p]),
            "label": run.class_name(int(run.labels[p])),
            "confidence": float(run.confidence[p]) if run.confidence is not None else None,
            "true_label": run.class_name(int(run.y_true[p])) if run.known[p] else None,
            "noise": bool(run.noise[p]) if run.noise is not None else False,
            "neighbours": [{"pos": q, "label": run.class_name(int(run.labels[q])), "similarity": s,
                            "given": bool(run.labeled[q]) if run.labeled is not None else False} for q, s in nb]})
    return out


def plot_neighbours(run: RunArtifacts, which: str = "least_confident", n: int = 6, k: int = 5,
                    thumb: int = 64) -> Figure:
    """Thumbnail rows: a sample (``least_confident`` or ``noise``-flagged), then its ``k`` nearest neighbours.

    Sample captions give pseudo-label, confidence and truth (red when wrong);
    neighbour captions give their label (``*`` = given label) and cosine similarity.
    """
    needs = ["labels", "knn", "images"] + (["noise_flags"] if which == "noise" else ["confidence"])
    _require(run, needs)
    table = neighbour_table(run, which, n, k)
    corr = run.correct
    cells, row_labels = [], []
    for t in table:
        p = t["pos"]
        conf = "" if t["confidence"] is None else f" {t['confidence']:.2f}"
        cap = f"{_short(t['label'], 9)}{conf}" + (f"\ntrue {_short(t['true_label'], 9)}" if t["true_label"] else "")
        row = [(run.image(p, thumb), cap, RED if corr[p] == 0 else "black")]
        for nb in t["neighbours"]:
            q = nb["pos"]
            star = "*" if nb["given"] else ""
            row.append((run.image(q, thumb), f"{star}{_short(nb['label'], 9)}\nsim {nb['similarity']:.2f}",
                        RED if corr[q] == 0 else "black"))
        cells.append(row)
        row_labels.append(_short(t["id"], 24) + ("\n(noise)" if t["noise"] else ""))
    what = "least confident pseudo-labels" if which == "least_confident" else "samples flagged as noise"
    return _mosaic(cells, row_labels, f"{len(table)} {what}: sample, then its {k} nearest neighbours "
                                      "(* = given label, red = wrong)", thumb=thumb, split_first=True)


# ------------------------------------------------------------------------------------------------ tiers
def tier_table(run: RunArtifacts) -> list[dict]:
    """Per tier of the pseudo-labels: count, share, mean confidence and (where truth is known) accuracy."""
    _require(run, ["labels", "tiers"])
    from ssl_pipeline.stages.pseudolabel import score

    unl = run.unlabeled
    y = run.y_true if run.y_true is not None and run.y_true.ndim == 1 else np.full(len(run), -1)
    conf = run.confidence if run.confidence is not None else np.ones(len(run), np.float32)
    out = []
    for t in np.unique(run.tier[unl]):
        sel = unl & (run.tier == t)
        m = score(run.labels, conf, y, sel)
        out.append({"tier": int(t), "n": int(sel.sum()), "share": float(sel.sum() / max(unl.sum(), 1)),
                    "mean_confidence": float(conf[sel].mean()), "n_scored": int(m.get("pseudolabel/n_scored", 0)),
                    "accuracy": m.get("pseudolabel/accuracy"), "n_noise":
                    int((sel & run.noise).sum()) if run.noise is not None else 0})
    return out


def plot_tiers(run: RunArtifacts) -> Figure:
    """Pseudo-labels per tier (bars) and their accuracy (line, where truth is known)."""
    rows = tier_table(run)
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x, [r["n"] for r in rows], color="#3b75af", label="pseudo-labels")
    ax.set_xticks(x, [f"tier {r['tier']}" for r in rows])
    ax.set_ylabel("pseudo-labels")
    for i, r in enumerate(rows):
        ax.text(i, r["n"], f"{r['share']:.0%}", ha="center", va="bottom", fontsize=8)
    acc = [r["accuracy"] for r in rows]
    ax2 = ax.twinx()
    ax2.plot(x, [np.nan if a is None else a for a in acc], "o-", color=RED, label="accuracy")
    ax2.plot(x, [r["mean_confidence"] for r in rows], "s--", color="#555555", label="mean confidence")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("accuracy / confidence")
    ax2.legend(fontsize=8, loc="lower left")
    ax.set_title(f"pseudo-label tiers of {run.labeler.get('name', 'the labeler')}", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------- multi-label
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


def multilabel_table(run: RunArtifacts) -> list[dict]:
    """Per label of a multi-label run: class-aware threshold and what the pseudo-labels decided.

    ``n_positive`` = images given the label, ``masked_share`` = share of images whose score fell in the
    uncertain band (left out of the loss), ``n_vetoed`` = positives removed by the context veto; where
    truth is known ``precision`` and ``recall`` of the positive decisions.
    """
    _require(run, ["multilabel_decisions"])
    by_label: dict[str, dict] = {}
    for r in multilabel_decisions(run):
        d = by_label.setdefault(r["label"], {"n": 0, "pos": 0, "masked": 0, "vetoed": 0, "tp": 0, "true": 0,
                                             "known": 0, "pos_known": 0})
        d["n"] += 1
        dec = r["decision"] == "1"
        d["pos"] += dec
        d["masked"] += r["masked"] == "1"
        d["vetoed"] += r.get("vetoed") == "1"
        if r.get("true", "") != "":
            t = r["true"] == "1"
            d["known"] += 1
            d["true"] += t
            d["pos_known"] += dec
            d["tp"] += dec and t
    out = []
    for name, d in by_label.items():
        thr = run.metrics.get(f"pseudolabel/threshold/{name}")
        row = {"label": name, "threshold": thr, "n_positive": d["pos"], "masked_share": d["masked"] / max(d["n"], 1),
               "n_vetoed": d["vetoed"]}
        if d["known"]:
            row.update({"n_true": d["true"], "precision": d["tp"] / d["pos_known"] if d["pos_known"] else None,
                        "recall": d["tp"] / d["true"] if d["true"] else None})
        out.append(row)
    return out


def plot_multilabel(run: RunArtifacts) -> Figure:
    """Per label: positive pseudo-labels vs true positives, precision / recall, masked share."""
    rows = multilabel_table(run)
    truth = bool(rows) and "precision" in rows[0]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(7.0, 0.6 * len(rows) + 3), 6.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    ax = axes[0]
    if truth:
        for k, (key, col) in enumerate((("precision", "#3b75af"), ("recall", "#ef8636"))):
            ax.bar(x + (k - 0.5) * 0.35, [np.nan if r[key] is None else r[key] for r in rows], 0.35, label=key,
                   color=col)
    ax.plot(x, [r["masked_share"] for r in rows], "s--", color="#555555", label="masked share")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax = axes[1]
    ax.bar(x - 0.2, [r["n_positive"] for r in rows], 0.4, label="positive pseudo-labels", color="#3b75af")
    if truth:
        ax.bar(x + 0.2, [r["n_true"] for r in rows], 0.4, label="true positives", color="#bbbbbb")
    ax.plot(x, [r["n_vetoed"] for r in rows], "v", color=RED, label="vetoed by context")
    ax.set_ylabel("unlabeled images")
    ax.legend(fontsize=7, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    ax.set_xticks(x, [_short(r["label"], 14) for r in rows], rotation=45, ha="right", fontsize=8)
    fig.suptitle("multi-label pseudo-labels per label (class-aware thresholds)", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ calibration
def calibration_table(run: RunArtifacts, n_bins: int = 10) -> list[dict]:
    """Equal-width confidence bins over the pseudo-labels with known truth: count, mean confidence, accuracy."""
    _require(run, ["labels", "truth", "confidence"])
    k = run.known
    conf = np.clip(run.confidence[k].astype(np.float64), 0.0, 1.0)
    right = (run.labels[k] == run.y_true[k]).astype(np.float64)
    b = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    out = []
    for i in range(n_bins):
        sel = b == i
        out.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "n": int(sel.sum()),
                    "mean_confidence": float(conf[sel].mean()) if sel.any() else None,
                    "accuracy": float(right[sel].mean()) if sel.any() else None})
    return out


def expected_calibration_error(rows: list[dict]) -> float:
    """Count-weighted mean |accuracy - confidence| over the bins of :func:`calibration_table`."""
    n = sum(r["n"] for r in rows)
    return sum(r["n"] * abs(r["accuracy"] - r["mean_confidence"]) for r in rows if r["n"]) / max(n, 1)


def plot_calibration(run: RunArtifacts, n_bins: int = 10) -> Figure:
    """Reliability diagram (accuracy vs confidence bin) and the confidence histogram of right / wrong labels."""
    rows = calibration_table(run, n_bins)
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    centers = np.array([(r["lo"] + r["hi"]) / 2 for r in rows])
    acc = np.array([np.nan if r["accuracy"] is None else r["accuracy"] for r in rows])
    ax.bar(centers, np.nan_to_num(acc), width=1 / n_bins, edgecolor="black", color="#3b75af", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for c, r in zip(centers, rows):
        if r["n"]:
            ax.text(c, (r["accuracy"] or 0) + 0.01, str(r["n"]), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"reliability (ECE {expected_calibration_error(rows):.3f}; counts above bars)", fontsize=10)
    k = run.known
    conf = run.confidence[k]
    right = run.labels[k] == run.y_true[k]
    bins = np.linspace(0, 1, n_bins * 2 + 1)
    ax2.hist([conf[right], conf[~right]], bins=bins, stacked=True, color=[GREEN, RED],
             label=[f"correct ({int(right.sum())})", f"wrong ({int((~right).sum())})"])
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("pseudo-labels")
    ax2.legend(fontsize=8)
    ax2.set_title("confidence of right and wrong pseudo-labels", fontsize=10)
    return fig


# ------------------------------------------------------------------------------------------ metrics
def metrics_table(run: RunArtifacts) -> list[dict]:
    """The run's metrics as ``[{"metric": key, "value": formatted}]``, sorted by key."""
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return [{"metric": k, "value": fmt(v)} for k, v in sorted(run.metrics.items())]


# ------------------------------------------------------------------------------------------ all views
@dataclass(frozen=True)
class View:
    """One figure of the report: what it needs (keys of :data:`REQUIREMENTS`) and how to draw it."""

    name: str
    title: str
    needs: tuple[str, ...]
    draw: Callable[[RunArtifacts, EmbeddingMap | None], Figure]
    uses_map: bool = False
    table: Callable[[RunArtifacts], list[dict]] | None = None
    caption: str = ""


VIEWS: list[View] = [
    View("map_clusters", "Embedding map by cluster", ("embeddings", "clusters"),
         lambda r, m: plot_map(r, m, "cluster"), uses_map=True,
         caption="k-means clusters of the cluster stage on a 2-D projection of the training embeddings."),
    View("map_labels", "Embedding map by pseudo-label", ("embeddings", "labels"),
         lambda r, m: plot_map(r, m, "label"), uses_map=True,
         caption="Pseudo-label of every shown point; stars mark the given labels."),
    View("map_correct", "Embedding map by correctness", ("embeddings", "labels", "truth"),
         lambda r, m: plot_map(r, m, "correct"), uses_map=True,
         caption="Green: pseudo-label matches the ground truth; red: it does not."),
    View("cluster_thumbnails", "Cluster thumbnails", ("clusters", "images"),
         lambda r, m: plot_cluster_thumbnails(r),
         caption="Random members of the largest clusters, captioned with their pseudo-labels."),
    View("class_quality", "Per-class pseudo-label quality", ("labels",), lambda r, m: plot_class_quality(r),
         table=class_table, caption="Precision, recall and coverage of the pseudo-labels per class."),
    View("least_confident", "Least confident pseudo-labels and their neighbours",
         ("labels", "knn", "images", "confidence"), lambda r, m: plot_neighbours(r, "least_confident"),
         caption="Each row: a sample, then its nearest neighbours in the cluster stage's kNN graph."),
    View("noise", "Samples flagged as noise and their neighbours", ("labels", "knn", "images", "noise_flags"),
         lambda r, m: plot_neighbours(r, "noise"),
         caption="Samples the labeler flagged as noisy, with their nearest neighbours."),
    View("tiers", "Pseudo-label tiers", ("labels", "tiers"), lambda r, m: plot_tiers(r), table=tier_table,
         caption="How many pseudo-labels each tier of the labeler holds, and how accurate each tier is."),
    View("calibration", "Confidence calibration", ("labels", "truth", "confidence"),
         lambda r, m: plot_calibration(r), table=calibration_table,
         caption="Accuracy per confidence bin: bars under the diagonal mean over-confidence."),
    View("multilabel", "Multi-label pseudo-label decisions", ("multilabel_decisions",),
         lambda r, m: plot_multilabel(r), table=multilabel_table,
         caption="Per label: positives decided by the class-aware thresholds, their precision and recall where "
                 "truth is known, the share of scores in the masked uncertain band, and context vetoes."),
]


class ViewResult(NamedTuple):
    """One drawn (or not drawn) view: ``figure`` is None when the view was ``skipped`` or ``error`` occurred."""

    view: View
    figure: Figure | None
    skipped: list[str]
    error: str | None = None


def views(run: RunArtifacts, emap: EmbeddingMap | Callable[[], EmbeddingMap] | None = None,
          on_error: str = "raise") -> Iterator[ViewResult]:
    """Draw every view of :data:`VIEWS` that applies to ``run``, in order.

    ``emap`` is an :class:`EmbeddingMap` or a callable computing one (called at
    most once, only if a map view applies; default :func:`embedding_map`).
    ``on_error="skip"`` logs a view that raises and yields it with ``error`` set
    instead of stopping.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    state: dict = {}

    def get_map() -> EmbeddingMap:
        if "map" not in state:
            try:
                state["map"] = emap if isinstance(emap, EmbeddingMap) else emap() if callable(emap) \
                    else embedding_map(run)
            except Exception as e:  # noqa: BLE001 - remembered so every map view reports the same failure
                state["map"] = e
        if isinstance(state["map"], Exception):
            raise state["map"]
        return state["map"]

    for v in VIEWS:
        why = missing(run, v.needs)
        if why:
            yield ViewResult(v, None, why)
            continue
        try:
            fig = v.draw(run, get_map() if v.uses_map else None)
        except Exception as e:
            if on_error == "raise":
                raise
            log.exception("report: view %s failed", v.name)
            yield ViewResult(v, None, [], f"{type(e).__name__}: {e}")
            continue
        yield ViewResult(v, fig, [])


def view(name: str) -> View:
    """The view of :data:`VIEWS` called ``name``."""
    for v in VIEWS:
        if v.name == name:
            return v
    raise KeyError(f"unknown view {name!r}; valid: {', '.join(v.name for v in VIEWS)}")


def draw_view(run: RunArtifacts, name: str, emap: EmbeddingMap | None = None, quiet: bool = False
              ) -> Figure | None:
    """Draw the view ``name`` (see :data:`VIEWS`), or print why it does not apply to ``run`` and return None.

    Map views use ``emap`` (computed with :func:`embedding_map` when not given).
    """
    v = view(name)
    why = missing(run, v.needs)
    if why:
        if not quiet:
            print(f"{v.title}: skipped, " + "; ".join(why))
        return None
    return v.draw(run, (emap if emap is not None else embedding_map(run)) if v.uses_map else None)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, rendered with the non-interactive Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> bytes:
    """Write the figure as a PNG (Agg) to ``path``; return the bytes written."""
    data = figure_png(fig, dpi)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data
