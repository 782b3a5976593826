"""Multi-label benchmark on MIML scenes (BENCHMARKS.md section 2): macro mAP at 5%, 10% and 20% labeled.

For each labeled fraction and seed (0, 1, 2), on the same split and in the same process:

* ``logreg``      one-vs-rest logistic regression (scikit-learn, C=10) on the pooled embeddings of the labeled
  images;
* ``labeled_only`` the alignment head trained on the labeled images only;
* ``head``        the alignment head with contexts and class-aware pseudo-labels;
* ``semi``        the pipeline's semi-supervised model (``retrain/test_map``): the student of the retrain
  (:mod:`ssl_pipeline.multilabel.student`), its mix of the head, a pooled linear model on labeled +
  pseudo-labeled images and neighbour smoothing chosen on held-out labeled images (``student``).

The archive is extracted once to ``~/.cache/ssl_pipeline/data/miml`` (outside the
repository); spatial tokens are cached in ``--cache`` so reruns only retrain.
Prints a markdown table and writes ``benchmarks/results/multilabel.json``.

    python benchmarks/multilabel.py [--fractions 0.05 0.1 0.2] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.common import CACHE_DATA, extract_archive  # noqa: E402

ARCHIVE = ROOT.parent / "shared" / "data" / "images" / "miml-scenes.tar.gz"
DATA = CACHE_DATA / "miml"



def logreg_map(feats, table, lab, test) -> float:
    from sklearn.linear_model import LogisticRegression

    from ssl_pipeline.multilabel.settings import macro_map

    pos = np.full(len(table), -1)
    pos[feats.rows] = np.arange(len(feats.rows))
    X, Y = feats.pooled, np.asarray(table.y_true)
    S = np.stack([LogisticRegression(C=10.0, max_iter=3000).fit(X[pos[lab]], Y[lab, c]).decision_function(
        X[pos[test]]) for c in range(Y.shape[1])], 1)
    return macro_map(Y[test], S)


def summarise(cells: list[dict], fractions: list[float]) -> tuple[list[dict], list[str]]:
    """Per-fraction means over seeds, and the markdown table rows."""
    rows = ["| labeled | n labeled | logreg (pooled) | alignment head, labeled only | alignment head + pseudo-labels "
            "| **semi-supervised model** | vs better baseline | min over seeds | students chosen "
            "| PL precision / recall | seconds / run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = []
    for frac in fractions:
        cs = [c for c in cells if c["fraction"] == frac]
        if not cs:
            continue
        mean = {k: float(np.mean([c[k] for c in cs])) for k in ("logreg", "labeled_only", "head", "semi", "n_labeled",
                                                                  "pl_precision", "pl_recall", "seconds")}
        mean["gain_pts"] = 100 * (mean["semi"] - max(mean["labeled_only"], mean["logreg"]))
        mean["min_gain_pts"] = min(100 * (c["semi"] - max(c["labeled_only"], c["logreg"])) for c in cs)
        chosen = ", ".join(c["student"] for c in cs)
        summary.append({"fraction": frac, "n_seeds": len(cs), "students": [c["student"] for c in cs], **mean})
        rows.append(f"| {frac:.0%} | {mean['n_labeled']:.0f} | {mean['logreg']:.4f} | {mean['labeled_only']:.4f} | "
                    f"{mean['head']:.4f} | **{mean['semi']:.4f}** | {mean['gain_pts']:+.2f} pts | "
                    f"{mean['min_gain_pts']:+.2f} pts | {chosen} | {mean['pl_precision']:.3f} / "
                    f"{mean['pl_recall']:.3f} | {mean['seconds']:.0f} |")
    return summary, rows


def write(a, cells: list[dict]) -> Path:
    summary, _ = summarise(cells, a.fractions)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"dataset": "miml-scenes", "seeds": a.seeds, "summary": summary, "cells": cells,
                               "overrides": a.overrides}, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ssl_pipeline" / "bench-cache"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "multilabel.json"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. ++multilabel.steps=400")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("ssl_pipeline").setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)

    from ssl_pipeline.artifacts import ArtifactCache
    from ssl_pipeline.data.multilabel import multilabel_csv_table
    from ssl_pipeline.multilabel.features import encode_tokens, load_features
    from ssl_pipeline.pipeline import run

    d = extract_archive(ARCHIVE, DATA) / "miml"
    cells = []
    for frac in a.fractions:
        for seed in a.seeds:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=["data=multilabel_csv", f"data.root={d / 'images'}",
                                                   f"data.manifest={d / 'labels.csv'}",
                                                   f"data.labeled_fraction={frac}", f"seed={seed}",
                                                   f"paths.cache_dir={a.cache}", *a.overrides])
            table = multilabel_csv_table(cfg.data)
            cache = ArtifactCache(cfg.paths.cache_dir)
            t0 = time.perf_counter()
            run_dir = Path(a.cache) / "runs" / f"f{frac}-s{seed}"
            m = run(cfg, run_dir)
            secs = time.perf_counter() - t0
            feats = load_features(encode_tokens(cfg, table, cache)[0])
            lab = np.flatnonzero(table.labeled)
            test = np.flatnonzero(table.test)
            cell = {"fraction": frac, "seed": seed, "n_labeled": int(m["train/n_labeled"]),
                    "logreg": logreg_map(feats, table, lab, test), "labeled_only": m["retrain/labeled_only_test_map"],
                    "head": m["retrain/head_test_map"], "semi": m["retrain/test_map"],
                    "logreg_pipeline": m["retrain/logreg_test_map"], "student": m["retrain/student"],
                    "val_student_map": m.get("val/student_map"), "val_logreg_map": m.get("val/logreg_map"),
                    "val_head_map": m.get("val/head_map"), "pl_precision": m.get("pseudolabel/precision"),
                    "pl_recall": m.get("pseudolabel/recall"), "n_contexts": m["contexts/n_contexts"],
                    "seconds": round(secs, 1)}
            cells.append(cell)
            print(json.dumps(cell), flush=True)
            write(a, cells)  # after every cell: an interrupted run keeps what it measured
    summary, rows = summarise(cells, a.fractions)
    print(f"\nMIML scenes, macro mAP on the test split, mean over seeds {a.seeds}\n")
    print("\n".join(rows))
    out = write(a, cells)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
