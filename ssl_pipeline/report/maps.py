"""Which views apply to a run, the embedding map, drawing aids and the cluster thumbnail grid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray

from ssl_pipeline.report.loading import RunArtifacts, multilabel_decisions

log = logging.getLogger(__name__)

GRAY = "#b0b0b0"
GREEN = "#2a9d4b"
RED = "#d1342f"


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


