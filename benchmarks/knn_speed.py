"""Exact kNN graph: the package's tiled search (numpy products + faiss heaps) against ``faiss.knn``.

    python benchmarks/knn_speed.py [--sizes 4114 20000] [--k 11] [--threads 1 2] [--repeats 3]
    python benchmarks/knn_speed.py --table     # reprint the table of benchmarks/results/knn_speed.json

"ssl_pipeline s" is ``exact_search(X, X, k)``, what ``knn_graph`` runs (the self-search of
``_top_k_self``); "one-sided tiles s" is ``_top_k(X, X, k)``, which computes every tile.

Rows: the caltech101 CLIP ViT-B/32 embeddings from ../shared/data when the size matches that file (4,114 x
512), else seeded random unit rows of 512 dimensions. Each method searches the rows against themselves for the
``k`` most similar (self included), ``--repeats`` times; the best time is kept. BLAS and OpenMP threads are
set with threadpoolctl and ``faiss.omp_set_num_threads``. Also prints which kernels each OpenBLAS in the
process chose (the faiss-cpu wheels bundle their own, which falls back to generic Prescott kernels on CPUs it
does not recognise: the reason ``ssl_pipeline.labeling.knn._top_k`` does its products with numpy's BLAS).
Writes benchmarks/results/knn_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, SHARED_DATA, markdown_table, write_json  # noqa: E402


def rows(n: int, data: Path) -> tuple[np.ndarray, str]:
    f = data / "clip_vitb32" / "caltech101.npz"
    if f.is_file():
        X = np.load(f)["X"].astype(np.float32)
        if len(X) == n:
            return X / np.linalg.norm(X, axis=1, keepdims=True), "caltech101 CLIP ViT-B/32"
    X = np.random.default_rng(0).standard_normal((n, 512)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True), "random unit rows"


def table(results: list[dict], libs: list[dict]) -> str:
    kernels = ", ".join(f"{x['library']}: {x['kernels']}" for x in libs)
    return (f"OpenBLAS kernels in the process: {kernels}\n\n"
            + markdown_table(["N x 512", "rows", "threads", "ssl_pipeline s", "one-sided tiles s", "faiss.knn s",
                              "speed-up", "same ids"],
                             [[r["n"], r["rows"], r["threads"], r["ssl_pipeline_s"], r.get("one_sided_s", "-"),
                               r["faiss_knn_s"], f"{r['speed_up']:.2f}x", r["same_neighbours"]] for r in results]))


def best_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=int, default=[4114, 20000])
    ap.add_argument("--k", type=int, default=11)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", default=None, help="folder holding clip_vitb32/ (default: ../shared/data)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "knn_speed.json"))
    ap.add_argument("--table", action="store_true", help="only print the table of --out")
    args = ap.parse_args()
    if args.table:
        d = json.loads(Path(args.out).read_text())
        print(table(d["results"], d["openblas"]))
        return

    import faiss
    from threadpoolctl import threadpool_info, threadpool_limits

    from ssl_pipeline.labeling.knn import _top_k, exact_search

    data = Path(args.data) if args.data else SHARED_DATA  # absent: random rows only
    libs = [{"library": Path(i["filepath"]).name, "kernels": i.get("architecture")}
            for i in threadpool_info() if i.get("internal_api") == "openblas"]
    results = []
    for n in args.sizes:
        X, source = rows(n, data)
        for t in args.threads:
            with threadpool_limits(limits=t):
                faiss.omp_set_num_threads(t)
                # what knn_graph runs (the self-search: each off-diagonal tile's product serves both blocks),
                # and the one-sided tiling it replaced (every tile computed)
                ours = best_time(lambda X=X: exact_search(X, X, args.k), args.repeats)
                one_sided = best_time(lambda X=X: _top_k(X, X, args.k), args.repeats)
                theirs = best_time(lambda X=X: faiss.knn(X, X, args.k, metric=faiss.METRIC_INNER_PRODUCT),
                                   args.repeats)
                same = float((exact_search(X, X, args.k)[1] == faiss.knn(X, X, args.k,
                                                                    metric=faiss.METRIC_INNER_PRODUCT)[1]).mean())
            results.append({"n": n, "rows": source, "threads": t, "ssl_pipeline_s": round(ours, 3),
                            "one_sided_s": round(one_sided, 3),
                            "faiss_knn_s": round(theirs, 3), "speed_up": round(theirs / ours, 2),
                            "same_neighbours": round(same, 4)})
            print(results[-1], flush=True)
    print()
    print(table(results, libs))
    write_json(args.out, {"k": args.k, "machine": platform.machine(), "processor": platform.processor(),
                          "openblas": libs, "results": results})


if __name__ == "__main__":
    main()
