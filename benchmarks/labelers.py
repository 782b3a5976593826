"""Pseudo-label quality on real CLIP embeddings: HDL against the transductive peers (BENCHMARKS.md 1, 1b).

Protocol: for seed ``s`` and ``n`` labels per class, ``rng = np.random.default_rng(s)`` and, for
every class in ascending order, ``rng.choice(np.flatnonzero(y == c), n, replace=False)`` are the
labeled rows; every other row is unlabeled. Metric: accuracy over the unlabeled rows, mean over seeds
(plus, for HDL, the accuracy of its most confident half, its expected calibration error and its k).

Image-only sets (``DATA/clip_vitb32/*.npz``): HDL without text against every image-only peer of
:mod:`benchmarks.peers`. Text sets (``DATA/clip_vitb32/text/*.npz``, files with ``text``): HDL with
the class-name text against zero-shot and TIM+text (and the image-only peers, for reference).
``--k-ablation`` also runs HDL at every fixed k of its grid (is the adaptive choice worth it?).

    python benchmarks/labelers.py [--sets food10 ...] [--shots 1 2 4 8] [--seeds 0 1 2]
                                  [--peers tim logreg ...] [--no-text] [--no-image] [--k-ablation]
                                  [--out benchmarks/results/labelers.json] [--data DIR]
                                  [--hdl key=value ...] [--blas-threads 1] [--append]
    python benchmarks/labelers.py --table [--out FILE]     # print the markdown tables of a results file
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

from benchmarks.common import limit_threads, print_results_table  # noqa: E402
from benchmarks.peers import IMAGE_PEERS, TEXT_PEERS  # noqa: E402
from ssl_pipeline.labeling.calibration import expected_calibration_error  # noqa: E402
from ssl_pipeline.labeling.hdl import HDL  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
NAMES = {"ncm": "NCM", "logreg": "logreg", "graph_lp": "graph LP", "bd_cspn": "BD-CSPN",
         "laplacian_shot": "LaplacianShot", "tim": "TIM", "pt_map": "PT-MAP", "zero_shot": "zero-shot",
         "tim_text": "TIM+text"}


def split(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The protocol's labeled mask: ``n`` rows per class, ``default_rng(seed)``, classes ascending."""
    rng = np.random.default_rng(seed)
    lab = np.concatenate([rng.choice(np.flatnonzero(y == c), n, replace=False) for c in np.unique(y)])
    mask = np.zeros(len(y), bool)
    mask[lab] = True
    return mask


CACHED = ("tim", "tim_text")  # the slow peers (1000 gradient steps): their results are reused across runs


def run_cell(X: np.ndarray, y: np.ndarray, n: int, seed: int, peers: dict, hdl_params: dict,
             text: np.ndarray | None, k_ablation: tuple[int, ...] = (), cache: dict | None = None,
             tag: str = "") -> dict:
    """Every peer and HDL on one (set, n, seed): accuracy on the unlabeled rows and seconds.

    ``cache`` (peer results by ``tag/n/seed/peer``) is read and filled for the peers in ``CACHED``.
    """
    m = split(y, n, seed)
    ym = np.where(m, y, -1)
    u = ~m
    out: dict[str, float] = {}
    for name, peer in peers.items():
        key = f"{tag}/{n}/{seed}/{name}"
        if cache is not None and name in CACHED and key in cache:
            out[name], out[f"{name}_seconds"] = cache[key]
            continue
        t = time.perf_counter()
        pred, _ = peer(X, ym, text)
        out[f"{name}_seconds"] = time.perf_counter() - t
        out[name] = float((pred[u] == y[u]).mean())
        if cache is not None and name in CACHED:
            cache[key] = (out[name], out[f"{name}_seconds"])
    t = time.perf_counter()
    hdl = HDL(**hdl_params).fit(X, ym, text=text)
    out["hdl_seconds"] = time.perf_counter() - t
    rows = np.flatnonzero(u)
    correct = hdl.labels_[rows] == y[rows]
    out["hdl"] = float(correct.mean())
    top = np.argsort(-hdl.confidence_[rows], kind="stable")[: len(rows) // 2]
    out["hdl_top50"] = float(correct[top].mean())
    out["hdl_ece"] = expected_calibration_error(hdl.confidence_[rows], correct)
    out["hdl_k"] = int(hdl.k_)
    out["hdl_noise_rate"] = float(hdl.noise_[rows].mean())
    for k in k_ablation:
        fixed = HDL(**{**hdl_params, "k": k}).fit(X, ym, text=text)
        out[f"hdl_k{k}"] = float((fixed.labels_[rows] == y[rows]).mean())
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


def load(f: Path) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    z = np.load(f)
    if "X" not in z.files or "y" not in z.files:  # a text-only file (imagenet1k: class names, no images)
        return None, None, None
    X = z["X"].astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    text = z["text"].astype(np.float32) if "text" in z.files else None
    return X, z["y"].astype(np.int64), text


def tables(result: dict) -> str:
    """The markdown tables (image-only, with text) and the summary lines of a results dict."""
    out = []
    for kind, title in (("image", "Without text (image-only peers)"), ("text", "With class-name text")):
        cells = [c for c in result["cells"] if c["kind"] == kind]
        if not cells:
            continue
        peers = cells[0]["peers"]
        ablation = sorted(int(k[5:]) for k in cells[0]["mean"] if k.startswith("hdl_k") and k[5:].isdigit())
        head = (["set", "n"] + [NAMES.get(p, p) for p in peers] + ["HDL", "HDL - best", "best peer", "HDL top-50%",
                                                                   "HDL ECE", "HDL k"]
                + [f"HDL k={k}" for k in ablation] + ["HDL s", "LaplacianShot s"])
        lines = [f"**{title}** (mean over seeds {cells[0]['seeds']})", "",
                 "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cells:
            mm = c["mean"]
            row = [c["set"], str(c["n"])] + [f"{mm[p]:.3f}" for p in peers]
            row += [f"**{mm['hdl']:.3f}**", f"{c['delta_pts']:+.1f}", NAMES.get(c["best_peer"], c["best_peer"]),
                    f"{mm['hdl_top50']:.3f}", f"{mm['hdl_ece']:.3f}", f"{mm['hdl_k']:.1f}"]
            row += [f"{mm[f'hdl_k{k}']:.3f}" for k in ablation]
            row += [f"{mm['hdl_seconds']:.2f}",
                    f"{mm['laplacian_shot_seconds']:.2f}" if "laplacian_shot_seconds" in mm else "-"]
            lines.append("| " + " | ".join(row) + " |")
        d = np.array([c["delta_pts"] for c in cells])
        worst = cells[int(np.argmin(d))]
        hs = sum(c["mean"]["hdl_seconds"] for c in cells)
        ls = sum(c["mean"].get("laplacian_shot_seconds", np.nan) for c in cells)
        lines += ["", f"HDL - best peer over {len(d)} cells: mean {d.mean():+.2f} pts, worst {d.min():+.2f} pts "
                  f"({worst['set']} n={worst['n']}), HDL behind in {int((d < 0).sum())}; total seconds HDL {hs:.1f}, "
                  f"LaplacianShot {ls:.1f}", ""]
        out.append("\n".join(lines))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding clip_vitb32/")
    ap.add_argument("--sets", nargs="*", default=None, help="set names (file stems); default: every file")
    ap.add_argument("--shots", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--peers", nargs="*", default=None, help="peer names (default: all)")
    ap.add_argument("--no-text", action="store_true", help="skip the text sets")
    ap.add_argument("--no-image", action="store_true", help="skip the image-only sets")
    ap.add_argument("--k-ablation", action="store_true", help="also run HDL at every fixed k of its grid")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "labelers.json")
    ap.add_argument("--peer-cache", type=Path, default=ROOT / "benchmarks" / "results" / "labelers_peer_cache.json",
                    help=f"results of the slow peers ({', '.join(CACHED)}) reused across runs")
    ap.add_argument("--fresh-peers", action="store_true", help="recompute the cached peers")
    ap.add_argument("--table", action="store_true", help="only print the markdown tables of --out")
    ap.add_argument("--append", action="store_true",
                    help="merge into the cells already in --out, replacing those of the same kind, set and n")
    ap.add_argument("--hdl", nargs="*", default=[], metavar="KEY=VALUE", help="HDL constructor overrides")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads for every method (1 avoids OpenBLAS stalls on busy machines; 0: default)")
    args = ap.parse_args(argv)
    if args.table:
        return print_results_table(args.out, tables)
    limit_threads(args.blas_threads)
    warnings.filterwarnings("ignore")

    folder = args.data / "clip_vitb32"
    if not folder.is_dir():
        print(f"skipped: no embeddings folder {folder} (pass --data DIR holding clip_vitb32/)")
        return 0
    jobs = [] if args.no_text else [("text", f) for f in sorted((folder / "text").glob("*.npz"))]
    jobs += [] if args.no_image else [("image", f) for f in sorted(folder.glob("*.npz"))]
    if args.sets:  # in the order given
        jobs = sorted([(k, f) for k, f in jobs if f.stem in args.sets], key=lambda j: args.sets.index(j[1].stem))
    hdl_params = parse_params(args.hdl)
    grid = tuple(hdl_params.get("k_grid", HDL().k_grid)) if args.k_ablation else ()
    chosen = set(args.peers) if args.peers is not None else None

    cache = {} if args.fresh_peers or not args.peer_cache.is_file() else json.loads(args.peer_cache.read_text())
    before = json.loads(args.out.read_text())["cells"] if args.append and args.out.is_file() else []
    cells = []
    for kind, f in jobs:
        X, y, text = load(f)
        if X is None or (kind == "text" and text is None):
            continue  # a text-only file (imagenet1k: no images) or one without a text array
        if kind == "image":
            text = None
        peers = {k: v for k, v in IMAGE_PEERS.items() if chosen is None or k in chosen}
        if kind == "text":
            peers = {**{k: v for k, v in TEXT_PEERS.items() if chosen is None or k in chosen}, **peers}
        compared = [p for p in peers if (kind == "image") or p in TEXT_PEERS]
        for n in args.shots:
            if np.bincount(y).min() <= n:
                print(f"{f.stem} n={n}: skipped (a class has <= {n} rows)", file=sys.stderr)
                continue
            runs = [run_cell(X, y, n, s, peers, hdl_params, text, grid, cache, f"{kind}/{f.stem}") for s in args.seeds]
            _write(args.peer_cache, cache)
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            best = max(compared, key=lambda b: mean[b]) if compared else None
            delta = 100 * (mean["hdl"] - mean[best]) if best else float("nan")
            cells.append({"kind": kind, "set": f.stem, "n": n, "seeds": args.seeds, "peers": list(peers),
                          "compared": compared, "mean": mean, "runs": runs, "best_peer": best, "delta_pts": delta})
            _write(args.out, {"protocol": "BENCHMARKS.md sections 1 and 1b", "hdl_params": hdl_params,
                              "cells": _merge(before, cells), "partial": True})
            print(f"[{kind}] {f.stem} n={n}: hdl {mean['hdl']:.3f} vs {best} {mean.get(best, float('nan')):.3f} "
                  f"({delta:+.1f} pts; hdl {mean['hdl_seconds']:.2f}s k={mean['hdl_k']:.1f})",
                  file=sys.stderr, flush=True)
    result = {"protocol": "BENCHMARKS.md sections 1 and 1b", "hdl_params": hdl_params,
              "cells": _merge(before, cells)}
    print(tables(result))
    _write(args.out, result)
    print(f"wrote {args.out}")
    return 0


def _merge(before: list[dict], cells: list[dict]) -> list[dict]:
    """``cells`` plus the cells of ``before`` (an earlier results file) of another (kind, set, n)."""
    new = {(c["kind"], c["set"], c["n"]) for c in cells}
    kept = [c for c in before if (c["kind"], c["set"], c["n"]) not in new]
    return sorted(kept + cells, key=lambda c: (c["kind"] != "text", c["set"], c["n"])) if kept else cells


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
