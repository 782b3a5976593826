"""The audit export: one row per unlabeled training sample, where its pseudo-label came from.

``pseudolabels.csv`` (and ``pseudolabels.parquet`` when pyarrow is installed)
holds no timestamps or run-specific paths, so two runs on the same inputs give
byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from ssl_pipeline.artifacts import atomic_write_text
from ssl_pipeline.data.table import SampleTable

log = logging.getLogger(__name__)

COLUMNS = ["id", "path", "label", "label_id", "confidence", "source", "tier", "cluster", "agreement", "noise",
           "true_label", "correct"]


def pseudolabel_rows(table: SampleTable, pl_dir: Path, cluster_dir: Path) -> list[dict]:
    """One dict per unlabeled training sample, in table order."""
    rows = np.load(pl_dir / "rows.npy")
    labels = np.load(pl_dir / "labels.npy")
    conf = np.load(pl_dir / "confidence.npy")
    tier = np.load(pl_dir / "tier.npy")
    noise = np.load(pl_dir / "noise.npy")
    agree = np.load(pl_dir / "agreement.npy")
    labeled = np.load(pl_dir / "labeled.npy")
    clusters = np.load(cluster_dir / "clusters.npy")
    labeler = json.loads((pl_dir / "labeler.json").read_text())["name"]
    y_true = np.asarray(table.y_true)
    out = []
    for i in np.flatnonzero(~labeled):
        r = int(rows[i])
        lab = int(labels[i])
        t = int(y_true[r])
        out.append({
            "id": table.ids[r], "path": table.paths[r] or "",
            "label": table.classes[lab] if 0 <= lab < len(table.classes) else "",
            "label_id": lab, "confidence": f"{float(conf[i]):.6f}", "source": f"{labeler}:tier{int(tier[i])}",
            "tier": int(tier[i]), "cluster": int(clusters[i]), "agreement": f"{float(agree[i]):.4f}",
            "noise": int(bool(noise[i])),
            "true_label": table.classes[t] if 0 <= t < len(table.classes) else "",
            "correct": "" if t < 0 else int(lab == t),
        })
    return out


def write_pseudolabels(rows: list[dict], run_dir: Path) -> Path:
    """Write ``pseudolabels.csv`` (+ Parquet when pyarrow is importable); return the CSV path."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path = run_dir / "pseudolabels.csv"
    atomic_write_text(path, buf.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return path
    table = pa.Table.from_pylist(rows) if rows else pa.table({c: [] for c in COLUMNS})
    pq.write_table(table, run_dir / "pseudolabels.parquet")
    return path
