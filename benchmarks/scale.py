"""Pseudo-labeling at scale: HDL through the command line vs sklearn LabelSpreading (kNN kernel).

    python benchmarks/scale.py [--sizes 50000 200000 1000000] [--dim 512] [--classes 100]
                               [--ls-timeout 1800] [--labeler hdl] [--exact-sizes 200000] [--append]

Data: ``clustered_embeddings`` below (fixed seed): each of ``classes`` classes is a
mixture of 3 Gaussian modes around random unit centres in ``dim`` dimensions,
noise sigma 2.2 / sqrt(dim), rows L2-normalised; 1% of each class labeled.

Each size runs ``python -m ssl_pipeline stage=pseudolabel data=embeddings ...``
in a subprocess under ``/usr/bin/time -v`` (wall time, peak RSS), reads
``metrics.json`` (accuracy, kNN recall), then fits sklearn ``LabelSpreading(
kernel="knn", n_neighbors=10, alpha=0.2)`` on the same data in a subprocess with
a time limit (sizes above ``--skip-ls-above`` are recorded as not run). Sizes in
``--exact-sizes`` also run HDL on the exact graph (``cluster.index=flat``), to
measure what the approximate graph costs in accuracy. Prints a markdown table and
writes benchmarks/results/scale.json (``--append`` adds to the rows already there,
replacing rows of the same size and method).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, markdown_table, write_json  # noqa: E402


def clustered_embeddings(n: int, d: int = 512, classes: int = 100, modes: int = 3, sigma: float = 2.2,
                         labeled: float = 0.01, seed: int = 0):
    """X (n, d) float32 unit rows, y (n,) int64, labeled mask (n,) bool: ``labeled`` of each class."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, modes, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=2, keepdims=True)
    y = rng.integers(0, classes, n)
    mode = rng.integers(0, modes, n)
    X = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):  # in chunks: no second n x d float64 copy
        e = min(n, s + 100_000)
        X[s:e] = centers[y[s:e], mode[s:e]] + sigma * rng.standard_normal((e - s, d), dtype=np.float32) / np.sqrt(d)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    mask = np.zeros(n, bool)
    for c in range(classes):
        idx = np.flatnonzero(y == c)
        mask[rng.choice(idx, max(1, int(round(labeled * len(idx)))), replace=False)] = True
    return X, y.astype(np.int64), mask


def timed(cmd: list[str], timeout: int) -> tuple[int, float, float, str]:
    """Run ``cmd`` under /usr/bin/time -v: (exit code, wall s, peak RSS GB, output tail)."""
    t = time.perf_counter()
    try:
        p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, time.perf_counter() - t, float("nan"), "timeout"
    wall = time.perf_counter() - t
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    return p.returncode, wall, int(m.group(1)) / 1e6 if m else float("nan"), (p.stdout + p.stderr)[-1500:]


LS_SCRIPT = """
import sys, json, time, numpy as np
from sklearn.semi_supervised import LabelSpreading
z = np.load(sys.argv[1]); X, y, yt = z["X"], z["y"], z["y_true"]
t = time.perf_counter()
ls = LabelSpreading(kernel="knn", n_neighbors=10, alpha=0.2, max_iter=100).fit(X, y)
u = y < 0
acc = float((ls.transduction_[u] == yt[u]).mean())
print("RESULT", json.dumps({"seconds": time.perf_counter() - t, "accuracy": acc}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[50_000, 200_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--labeler", default="hdl")
    ap.add_argument("--ls-timeout", type=int, default=1800)
    ap.add_argument("--skip-ls-above", type=int, default=200_000, help="skip LabelSpreading above this size")
    ap.add_argument("--exact-sizes", nargs="*", type=int, default=[200_000],
                    help="sizes that also run HDL with an exact graph (cluster.index=flat)")
    ap.add_argument("--append", action="store_true", help="merge into the existing results file")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDE[,OVERRIDE]",
                    help="also run HDL with Hydra overrides, e.g. 'seed admission=+pseudolabel.labeler.admission=seed'")
    ap.add_argument("--only-variants", action="store_true", help="run only the --variant runs (no default run)")
    ap.add_argument("--table", action="store_true", help="only print the table of the existing results file")
    a = ap.parse_args()
    results = []
    if a.table:
        a.append, a.sizes = True, []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for n in a.sizes:
            X, y, mask = clustered_embeddings(n, a.dim, a.classes)
            f = work / f"synth{n}.npz"
            np.savez(f, X=X, y=np.where(mask, y, -1), y_true=y)
            del X
            variants = [("auto index", [])] + ([("flat index", ["cluster.index=flat"])] if n in a.exact_sizes else [])
            if a.only_variants:
                variants = []
            variants += [(v.split("=", 1)[0], v.split("=", 1)[1].split(",")) for v in a.variant]
            for name, extra in variants:
                rd = work / f"run{n}{name.replace(' ', '_')}"
                rc, wall, rss, tail = timed([sys.executable, "-m", "ssl_pipeline", "stage=pseudolabel",
                                             "data=embeddings", f"data.path={f}", f"pseudolabel={a.labeler}",
                                             f"hydra.run.dir={rd}", f"paths.cache_dir={work / 'cache'}", *extra],
                                            timeout=7200)
                if rc != 0:
                    print(f"N={n} {name}: pipeline failed ({rc}): {tail}")
                    continue
                m = json.loads((rd / "metrics.json").read_text())
                results.append({"n": n, "method": f"{a.labeler} ({name})", "seconds": wall, "peak_rss_gb": rss,
                                "accuracy": m.get("pseudolabel/accuracy"), "knn_recall": m.get("cluster/knn_recall"),
                                "index": m.get("cluster/index"), "graph_seconds": m.get("cluster/graph_seconds"),
                                "cluster_seconds": m.get("cluster/seconds"),
                                "pseudolabel_seconds": m.get("pseudolabel/seconds"),
                                "ivf_nprobe": m.get("cluster/ivf_nprobe"), "ivf_nlist": m.get("cluster/ivf_nlist"),
                                "k": m.get("pseudolabel/k"), "n_tiers": m.get("pseudolabel/n_tiers")})
                print(results[-1], flush=True)
            if n <= a.skip_ls_above:
                rc, wall, rss, tail = timed([sys.executable, "-c", LS_SCRIPT, str(f)], timeout=a.ls_timeout)
                r = {"n": n, "method": "sklearn LabelSpreading (knn)", "seconds": wall, "peak_rss_gb": rss}
                if rc == 0 and "RESULT" in tail:
                    r["accuracy"] = json.loads(tail.split("RESULT", 1)[1].strip().splitlines()[0])["accuracy"]
                else:
                    r["accuracy"] = None
                    r["note"] = "did not finish" if rc == 124 else f"failed ({rc})"
                results.append(r)
                print(r, flush=True)
            elif not a.append:  # appending keeps an earlier LabelSpreading row of this size
                results.append({"n": n, "method": "sklearn LabelSpreading (knn)", "seconds": None, "peak_rss_gb": None,
                                "accuracy": None, "note": f"not run (N > {a.skip_ls_above})"})
            f.unlink()
    if a.append and Path(a.out).exists():
        old = json.loads(Path(a.out).read_text())
        if a.table:  # the header describes the data the file's rows were measured on
            a.dim, a.classes = old.get("dim", a.dim), old.get("classes", a.classes)
        new_keys = {(r["n"], r["method"]) for r in results}
        results = [r for r in old.get("results", []) if (r["n"], r["method"]) not in new_keys] + results
        results.sort(key=lambda r: (r["n"], r["method"]))
        a.sizes = sorted({r["n"] for r in results})

    def num(v, digits):
        return "-" if v is None or v != v else round(v, digits)

    rows = [[r["n"], r["method"], num(r["seconds"], 1), num(r["peak_rss_gb"], 2), num(r.get("knn_recall"), 3),
             num(r.get("accuracy"), 4) if r.get("accuracy") is not None else r.get("note", "-")] for r in results]
    print(f"\nScale: synthetic clustered embeddings, d={a.dim}, {a.classes} classes, 1% labeled\n")
    print(markdown_table(["N", "method", "wall s", "peak RSS GB", "kNN recall@10", "accuracy"], rows))
    for n in a.sizes:
        h = [r for r in results if r["n"] == n and r["method"] == f"{a.labeler} (auto index)"]
        ls = [r for r in results if r["n"] == n and r["method"].startswith("sklearn") and r.get("accuracy")]
        if h and ls:
            print(f"N={n}: speed-up over LabelSpreading {ls[0]['seconds'] / h[0]['seconds']:.1f}x, "
                  f"accuracy {h[0]['accuracy'] - ls[0]['accuracy']:+.4f}")
    if a.table:
        return
    write_json(a.out, {"dim": a.dim, "classes": a.classes, "labeled": 0.01, "cpus": os.cpu_count(),
                       "machine": platform.processor() or platform.machine(), "results": results})


if __name__ == "__main__":
    main()
