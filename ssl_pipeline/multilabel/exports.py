"""A multi-label run's pseudo-label exports into the run directory.

:func:`export_pseudolabels` writes ``pseudolabels_multilabel.csv`` (one row per unlabeled image and label),
``pseudolabels.csv`` (the generic audit columns, one row per unlabeled image) and ``contexts.json`` from a
pseudolabel artifact.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ssl_pipeline.artifacts import atomic_write_text
from ssl_pipeline.audit import COLUMNS
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.stage_io import read_arrays


def _write_generic(rows: list[dict], run_dir: Path) -> None:
    """``pseudolabels.csv`` in the pipeline's audit columns (:data:`ssl_pipeline.audit.COLUMNS`)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(run_dir / "pseudolabels.csv", buf.getvalue())


def export_pseudolabels(table: SampleTable, pl_dir: Path, run_dir: Path) -> None:
    """Write ``pseudolabels_multilabel.csv``, ``pseudolabels.csv`` and ``contexts.json`` from a pseudolabel artifact."""
    a = read_arrays(pl_dir, ("rows", "labeled", "scores", "decision", "counted", "vetoed"))
    atomic_write_text(run_dir / "contexts.json", (pl_dir / "contexts.json").read_text())
    sel = ~a["labeled"].astype(bool)
    unl = a["rows"][sel]
    S, D, K, V = (a[k][sel] for k in ("scores", "decision", "counted", "vetoed"))
    Y = np.asarray(table.y_true)
    classes = table.classes
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "path", "label", "score", "decision", "masked", "vetoed", "true"])
    rows = []
    for i, r in enumerate(unl):
        known = bool((Y[r] >= 0).all())
        for c, name in enumerate(classes):
            w.writerow([table.ids[r], table.paths[r] or "", name, f"{S[i, c]:.6f}", int(D[i, c]), int(not K[i, c]),
                        int(V[i, c]), int(Y[r, c]) if known else ""])
        pred = [classes[c] for c in np.flatnonzero(D[i])]
        true = [classes[c] for c in np.flatnonzero(Y[r] == 1)] if known else []
        cert = np.where(D[i], S[i], 1.0 - S[i])
        rows.append({
            "id": table.ids[r], "path": table.paths[r] or "", "label": "|".join(pred), "label_id": -1,
            "confidence": f"{float(cert.mean()):.6f}", "source": "multilabel:csa", "tier": 0, "cluster": -1,
            "agreement": f"{float(K[i].mean()):.4f}", "noise": int(bool(V[i].any())),
            "true_label": "|".join(true) if known else "",
            "correct": int(D[i].astype(int).tolist() == (Y[r] == 1).astype(int).tolist()) if known else "",
        })
    atomic_write_text(run_dir / "pseudolabels_multilabel.csv", buf.getvalue())
    _write_generic(rows, run_dir)
