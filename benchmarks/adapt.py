"""Labeler accuracy with and without the SimCSE++ adaptation (adapt=simcse_pp), same run (BENCHMARKS.md 1).

For every shared CLIP set (``DATA/clip_vitb32/*.npz``), the projection of
:class:`ssl_pipeline.adapt.SimCSEPPAdapter` is fitted once per setting on ALL rows (labels unused,
as the adapt stage does on every training row), then HDL and the simple peers (logistic
regression, graph LP of :mod:`benchmarks.peers`) label the same protocol splits (seed ``s``, ``n``
labels per class, ``default_rng(s)``, classes ascending) in the raw space and in each adapted space.
Settings: ``default`` is conf/adapt/simcse_pp.yaml (the package defaults); ``strong`` trains
10x longer at 10x the learning rate (to show which way more adaptation moves the labelers).
Metric: accuracy over the unlabeled rows, mean over seeds.

    python benchmarks/adapt.py [--sets caltech101 ...] [--shots 1 4] [--seeds 0 1 2]
                               [--settings default strong] [--out benchmarks/results/adapt.json]
    python benchmarks/adapt.py --table [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    embedding_sets,
    limit_threads,
    markdown_table,
    print_results_table,
    write_json,
)
from benchmarks.labelers import load, split  # noqa: E402
from benchmarks.peers import IMAGE_PEERS  # noqa: E402
from ssl_pipeline.adapt import SimCSEPPAdapter  # noqa: E402
from ssl_pipeline.labeling.hdl import HDL  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
SETTINGS = {"default": {}, "strong": {"epochs": 50, "lr": 1e-3}}
LABELERS = ("hdl", "logreg", "graph_lp")


def label(name: str, X: np.ndarray, ym: np.ndarray) -> np.ndarray:
    if name == "hdl":
        return HDL().fit(X, ym).labels_
    return IMAGE_PEERS[name](X, ym)[0]


def run_set(X: np.ndarray, y: np.ndarray, shots, seeds, settings) -> tuple[dict, list[dict]]:
    spaces, info = {"raw": X}, {}
    for s in settings:
        t = time.perf_counter()
        a = SimCSEPPAdapter(**SETTINGS[s], seed=0).fit(X)
        spaces[s] = a.transform(X)
        info[s] = {"seconds": time.perf_counter() - t, "loss_first": a.history_[0]["loss"],
                   "loss_last": a.history_[-1]["loss"], "mean_cos_to_input": float((spaces[s] * X).sum(1).mean())}
    cells = []
    for n in shots:
        if np.bincount(y).min() <= n:
            continue
        runs = []
        for seed in seeds:
            m = split(y, n, seed)
            ym, u = np.where(m, y, -1), ~m
            r = {}
            for space, Z in spaces.items():
                for lab in LABELERS:
                    t = time.perf_counter()
                    r[f"{lab}/{space}"] = float((label(lab, Z, ym)[u] == y[u]).mean())
                    r[f"{lab}/{space}_seconds"] = time.perf_counter() - t
            runs.append(r)
        cells.append({"n": n, "mean": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}, "runs": runs})
    return info, cells


def tables(result: dict) -> str:
    settings = result["settings"]
    head = ["set", "n"] + [f"{lab} {sp}" for lab in LABELERS for sp in ["raw", *settings]]
    rows, deltas = [], {(lab, s): [] for lab in LABELERS for s in settings}
    for name, entry in result["sets"].items():
        for c in entry["cells"]:
            mm = c["mean"]
            rows.append([name, c["n"]] + [mm[f"{lab}/{sp}"] for lab in LABELERS for sp in ["raw", *settings]])
            for lab in LABELERS:
                for s in settings:
                    deltas[(lab, s)].append(100 * (mm[f"{lab}/{s}"] - mm[f"{lab}/raw"]))
    lines = [f"Labeler accuracy on the unlabeled rows, raw CLIP space vs SimCSE++-adapted (mean over seeds "
             f"{result['seeds']}; adapter settings {json.dumps({s: SETTINGS[s] for s in settings})} over the "
             "package defaults)", "", markdown_table(head, rows), ""]
    for (lab, s), d in deltas.items():
        if d:
            lines.append(f"- {lab}, {s} - raw: mean {np.mean(d):+.2f} pts, best {max(d):+.2f}, worst {min(d):+.2f} "
                         f"over {len(d)} cells")
    secs = {s: sum(e["adapt"][s]["seconds"] for e in result["sets"].values()) for s in settings}
    lines.append("- adapter fit seconds (all sets): " + ", ".join(f"{s} {v:.1f}" for s, v in secs.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding clip_vitb32/")
    ap.add_argument("--sets", nargs="*", default=None)
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "adapt.json")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (0: library default)")
    args = ap.parse_args(argv)
    if args.table:
        return print_results_table(args.out, tables)
    limit_threads(args.threads)
    warnings.filterwarnings("ignore")
    files = embedding_sets(args.data, args.sets)
    if files is None:
        return 0
    result = {"protocol": "BENCHMARKS.md section 1", "seeds": args.seeds, "settings": args.settings, "sets": {}}
    for f in files:
        X, y, _ = load(f)
        info, cells = run_set(X, y, args.shots, args.seeds, args.settings)
        result["sets"][f.stem] = {"adapt": info, "cells": cells}
        write_json(args.out, result)
        for c in cells:
            mm = c["mean"]
            print(f"{f.stem} n={c['n']}: " + ", ".join(f"{k} {v:.3f}" for k, v in mm.items()
                                                      if not k.endswith("_seconds")), file=sys.stderr, flush=True)
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
