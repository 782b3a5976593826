"""Pseudo-label quality on real CLIP embeddings: HDL against the baselines (BENCHMARKS.md section 1).

Protocol: for seed ``s`` and ``n`` labels per class, ``rng = np.random.default_rng(s)`` and, for
every class in ascending order, ``rng.choice(np.flatnonzero(y == c), n, replace=False)`` are the
labeled rows; every other row is unlabeled. Metric: accuracy over the unlabeled rows (and, for HDL,
over its most confident half), mean over seeds. Baselines: nearest class mean, logistic regression
(C=10, labeled rows only), sklearn LabelSpreading (knn, k=10, alpha=0.2), naive tiered kNN vote (k=10).

    python benchmarks/labelers.py [--sets food10 ...] [--shots 1 2 4 8] [--seeds 0 1 2]
                                  [--out benchmarks/results/labelers.json] [--data DIR]
                                  [--hdl key=value ...] [--blas-threads 1]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ssl_pipeline.labeling.baselines import LabelSpreadingLabeler, Prototype  # noqa: E402
from ssl_pipeline.labeling.hdl import HDL, NaiveTieredVote  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
BASELINES = ("prototype", "logreg", "label_spreading", "naive_tiered")


def split(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The protocol's labeled mask: ``n`` rows per class, ``default_rng(seed)``, classes ascending."""
    rng = np.random.default_rng(seed)
    lab = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in np.unique(y)])
    mask = np.zeros(len(y), bool)
    mask[lab] = True
    return mask


def logreg_labels(X: np.ndarray, y_masked: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    m = y_masked >= 0
    return LogisticRegression(C=10, max_iter=2000).fit(X[m], y_masked[m]).predict(X)


def run_cell(X: np.ndarray, y: np.ndarray, n: int, seed: int, hdl_params: dict) -> dict:
    """All methods on one (set, n, seed): accuracy on unlabeled rows, HDL top-50% accuracy and time."""
    m = split(y, n, seed)
    ym = np.where(m, y, -1)
    u = ~m
    out: dict[str, float] = {}
    out["prototype"] = float((Prototype().fit(X, ym).labels_[u] == y[u]).mean())
    out["logreg"] = float((logreg_labels(X, ym)[u] == y[u]).mean())
    out["label_spreading"] = float((LabelSpreadingLabeler(10, 0.2).fit(X, ym).labels_[u] == y[u]).mean())
    out["naive_tiered"] = float((NaiveTieredVote(k=10).fit(X, ym).labels_[u] == y[u]).mean())
    t = time.perf_counter()
    hdl = HDL(**hdl_params).fit(X, ym)
    out["hdl_seconds"] = time.perf_counter() - t
    rows = np.flatnonzero(u)
    out["hdl"] = float((hdl.labels_[rows] == y[rows]).mean())
    top = rows[np.argsort(-hdl.confidence_[rows], kind="stable")[: len(rows) // 2]]
    out["hdl_top50"] = float((hdl.labels_[top] == y[top]).mean())
    out["hdl_k"] = int(hdl.k_)
    out["hdl_n_clusters"] = int(hdl.n_clusters_)
    out["hdl_delta_k"] = float(hdl.delta_k_)
    out["hdl_noise_rate"] = float(hdl.noise_[rows].mean())
    return out


def parse_params(items: list[str]) -> dict:
    params = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding clip_vitb32/*.npz")
    ap.add_argument("--sets", nargs="*", default=None, help="set names (file stems); default: every file")
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "labelers.json")
    ap.add_argument("--hdl", nargs="*", default=[], metavar="KEY=VALUE", help="HDL constructor overrides")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads for every method (1 avoids OpenBLAS stalls on busy machines; 0: default)")
    args = ap.parse_args(argv)
    if args.blas_threads > 0:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.blas_threads, user_api="blas")
    warnings.filterwarnings("ignore")

    folder = args.data / "clip_vitb32"
    if not folder.is_dir():
        print(f"skipped: no embeddings folder {folder} (pass --data DIR holding clip_vitb32/*.npz)")
        return 0
    files = sorted(folder.glob("*.npz"))
    if args.sets:
        files = [f for f in files if f.stem in set(args.sets)]
    if not files:
        print(f"skipped: no matching .npz file in {folder}")
        return 0
    hdl_params = parse_params(args.hdl)

    cells = []
    for f in files:
        z = np.load(f)
        X = z["X"].astype(np.float32)
        X /= np.linalg.norm(X, axis=1, keepdims=True)
        y = z["y"].astype(np.int64)
        for n in args.shots:
            if np.bincount(y).min() <= n:
                print(f"{f.stem} n={n}: skipped (a class has <= {n} rows)", file=sys.stderr)
                continue
            runs = [run_cell(X, y, n, s, hdl_params) for s in args.seeds]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            best_name = max(BASELINES, key=lambda b: mean[b])
            best_seed = [max(r[b] for b in BASELINES) for r in runs]
            cells.append({"set": f.stem, "n": n, "seeds": args.seeds, "mean": mean, "runs": runs,
                          "best_baseline": best_name,
                          "delta_pts": 100 * (mean["hdl"] - mean[best_name]),
                          "worst_seed_delta_pts": 100 * min(r["hdl"] - b for r, b in zip(runs, best_seed))})
            print(f"{f.stem} n={n}: hdl {mean['hdl']:.3f} vs {best_name} {mean[best_name]:.3f} "
                  f"({cells[-1]['delta_pts']:+.1f} pts, {mean['hdl_seconds']:.1f}s)", file=sys.stderr, flush=True)

    head = ("| set | n | nearest class mean | logreg (C=10) | LabelSpreading (knn) | naive tiered vote | HDL "
            "| HDL top-50% | HDL - best | HDL k | HDL s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for c in cells:
        m = c["mean"]
        print(f"| {c['set']} | {c['n']} | {m['prototype']:.3f} | {m['logreg']:.3f} | {m['label_spreading']:.3f} "
              f"| {m['naive_tiered']:.3f} | **{m['hdl']:.3f}** | {m['hdl_top50']:.3f} | {c['delta_pts']:+.1f} "
              f"| {m['hdl_k']:.0f} | {m['hdl_seconds']:.1f} |")
    deltas = np.array([c["delta_pts"] for c in cells])
    if len(deltas):
        print(f"\nHDL - best baseline over {len(deltas)} cells: mean {deltas.mean():+.2f} pts, "
              f"worst {deltas.min():+.2f} pts; top-50% > all-rows accuracy in "
              f"{sum(c['mean']['hdl_top50'] > c['mean']['hdl'] for c in cells)}/{len(cells)} cells")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"protocol": "BENCHMARKS.md section 1", "hdl_params": hdl_params,
                                    "cells": cells}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
