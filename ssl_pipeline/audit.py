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


def pseudolabel_columns(table: SampleTable, pl_dir: Path, cluster_dir: Path) -> dict[str, np.ndarray]:
    """The audit columns (each (M,), M = unlabeled training samples, table order) as arrays."""
    rows = np.load(pl_dir / "rows.npy")
    labeled = np.load(pl_dir / "labeled.npy")
    sel = np.flatnonzero(~labeled)
    r = rows[sel]
    labels = np.load(pl_dir / "labels.npy")[sel]
    tier = np.load(pl_dir / "tier.npy")[sel]
    labeler = json.loads((pl_dir / "labeler.json").read_text())["name"]
    classes = np.asarray(list(table.classes) + [""], dtype=object)  # index -1 -> ""
    y_true = np.asarray(table.y_true)[r]
    ids = np.asarray(table.ids, dtype=object)[r]
    paths = np.asarray([p or "" for p in table.paths], dtype=object)[r]
    return {
        "id": ids, "path": paths,
        "label": classes[np.where((labels >= 0) & (labels < len(table.classes)), labels, -1)],
        "label_id": labels,
        "confidence": np.char.mod("%.6f", np.load(pl_dir / "confidence.npy")[sel].astype(np.float64)),
        "source": np.char.add(f"{labeler}:tier", tier.astype(str)),
        "tier": tier, "cluster": np.load(cluster_dir / "clusters.npy")[sel],
        "agreement": np.char.mod("%.4f", np.load(pl_dir / "agreement.npy")[sel].astype(np.float64)),
        "noise": np.load(pl_dir / "noise.npy")[sel].astype(np.int64),
        "true_label": classes[np.where(y_true >= 0, y_true, -1)],
        "correct": np.where(y_true < 0, "", (labels == y_true).astype(np.int64).astype(str)),
    }


def write_pseudolabels(columns: dict[str, np.ndarray], run_dir: Path, chunk: int = 100_000) -> Path:
    """Write ``pseudolabels.csv`` (+ Parquet when pyarrow is importable), in chunks; return the CSV path."""
    n = len(columns["id"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for s in range(0, n, chunk):
        w.writerows(zip(*(columns[c][s:s + chunk].tolist() for c in COLUMNS)))
    path = run_dir / "pseudolabels.csv"
    atomic_write_text(path, buf.getvalue())
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return path
    pq.write_table(pa.table({c: columns[c].tolist() if columns[c].dtype == object else columns[c]
                             for c in COLUMNS}), run_dir / "pseudolabels.parquet")
    return path
