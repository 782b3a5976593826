"""Multi-label decision, calibration and metrics views of a run."""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.figure import Figure

from ssl_pipeline.report.loading import RunArtifacts, multilabel_decisions
from ssl_pipeline.report.maps import _require, _short

log = logging.getLogger(__name__)

GRAY = "#b0b0b0"
GREEN = "#2a9d4b"
RED = "#d1342f"



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


