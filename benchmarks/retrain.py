"""Retrain benchmark: pseudo-label quality, the retrained model and the labeled-only model, on three kinds of data.

    python benchmarks/retrain.py [--cases demo cifar10 miml] [--cache DIR] [--blas-threads 1]
    python benchmarks/retrain.py --table          # the README table from benchmarks/results/retrain.json

Each case is one run of the command line, ``python -m ssl_pipeline ...`` (default config, seed 0), the
way a user runs it; the figures are read from the run's ``metrics.json``:

* ``demo``     the built-in demo (5,000 MNIST digits, 4 labels per class);
* ``cifar10``  CIFAR-10 JPEG image folder from ../shared/data/images (the first 100 images per class of
               train and of test, as the acceptance check takes them), ``data.labeled_per_class=4``;
* ``miml``     MIML scenes (multi-label, 10% labeled, ``data.test_fraction`` split): macro mAP instead
               of accuracy (pseudo-labels: their mAP on the unlabeled training images).

``--cache DIR`` keeps one artifact cache per case under DIR (reruns reuse the encodings); seconds are
the retrain stage's own (``retrain/seconds``, measured when it was computed) and the whole run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    CACHE_DATA,
    REPO,
    extract_archive,
    markdown_table,
    print_results_table,
    shared_data,
    write_json,
)

OUT = REPO / "benchmarks" / "results" / "retrain.json"



def subset(src: Path | None, per_class: int, out: Path) -> Path:
    """The first ``per_class`` files (sorted) of each class folder of ``src``, copied to ``out``."""
    if not (out / ".ok").exists():
        for c in sorted(p for p in src.iterdir() if p.is_dir()):
            (out / c.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(c.iterdir())[:per_class]:
                shutil.copy(f, out / c.name / f.name)
        (out / ".ok").touch()
    return out


def case_overrides(name: str, data: Path) -> tuple[list[str], bool]:
    """(CLI overrides, multi-label?) of a case."""
    if name == "demo":
        return [], False
    if name == "cifar10":
        sub = CACHE_DATA / "cifar10-100pc"
        d = None if (sub / "train" / ".ok").exists() and (sub / "test" / ".ok").exists() else \
            extract_archive(data / "images" / "cifar10-jpeg.tar.gz", CACHE_DATA / "cifar10")
        train = subset(d / "train" if d else None, 100, sub / "train")
        test = subset(d / "test" if d else None, 100, sub / "test")
        return ["data=image_folder", f"data.root={train}", f"data.test_root={test}", "data.labeled_per_class=4"], False
    if name == "miml":
        d = extract_archive(data / "images" / "miml-scenes.tar.gz", CACHE_DATA / "miml") / "miml"
        return ["data=multilabel_csv", f"data.root={d / 'images'}", f"data.manifest={d / 'labels.csv'}",
                "data.labeled_fraction=0.1"], True
    sys.exit(f"unknown case {name!r}: demo, cifar10 or miml")


def run_case(name: str, a) -> dict:
    over, multilabel = case_overrides(name, shared_data(a.data))
    cache = Path(a.cache) / name
    run_dir = cache / "runs" / "seed0"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if a.blas_threads > 0:
        env.update({k: str(a.blas_threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")})
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ssl_pipeline", *over, f"hydra.run.dir={run_dir}",
                        f"paths.cache_dir={cache / 'cache'}", *a.overrides], env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"{name}: run failed (exit {p.returncode}): {(p.stdout + p.stderr)[-1500:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    if multilabel:
        cell = {"metric": "macro mAP", "pseudolabels": m.get("pseudolabel/map"), "retrained": m["retrain/test_map"],
                "labeled_only": m["retrain/labeled_only_test_map"]}
    else:
        cell = {"metric": "accuracy", "pseudolabels": m["pseudolabel/accuracy"],
                "retrained": m["retrain/test_accuracy"], "labeled_only": m["retrain/labeled_only_test_accuracy"],
                "recipe": m.get("retrain/recipe")}
    cell.update(case=name, retrain_seconds=m.get("retrain/seconds"), run_seconds=round(secs, 1),
                model_folder=(run_dir / "model" / "model.json").exists())
    print(json.dumps(cell), flush=True)
    return cell


def table(res: dict) -> str:
    rows = []
    for c in res["cells"]:
        rows.append([c["case"], c["metric"], c["pseudolabels"], c["retrained"], c["labeled_only"],
                     f"{100 * (c['retrained'] - c['labeled_only']):+.1f}",
                     f"{100 * (c['retrained'] - c['pseudolabels']):+.1f}" if c["pseudolabels"] is not None else "",
                     c.get("recipe") or "", c["retrain_seconds"]])
    return markdown_table(["data", "metric", "pseudo-labels", "retrained", "labeled only", "vs labeled only (pts)",
                           "vs pseudo-labels (pts)", "recipe", "retrain s"], rows) + \
        f"\n\nseed 0, default config; {res['threads']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["demo", "cifar10", "miml"])
    ap.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "ssl_pipeline" / "bench-retrain"))
    ap.add_argument("--blas-threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every case")
    a = ap.parse_args()
    if a.table:
        sys.exit(print_results_table(Path(a.out), table))
    cells = [run_case(n, a) for n in a.cases]
    threads = f"{a.blas_threads} BLAS thread(s)" if a.blas_threads > 0 else "default threads"
    res = {"cells": cells, "threads": threads, "overrides": a.overrides}
    write_json(a.out, res)
    print(table(res))


if __name__ == "__main__":
    main()
