"""Per-class quality, nearest-neighbour and tier views of a run."""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import NDArray

from ssl_pipeline.report.loading import RunArtifacts
from ssl_pipeline.report.maps import _mosaic, _require, _short

log = logging.getLogger(__name__)

GRAY = "#b0b0b0"
GREEN = "#2a9d4b"
RED = "#d1342f"


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


