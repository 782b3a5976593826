"""The built-in demo end to end with every labeler: pseudo-label quality and retrained test accuracy.

    python benchmarks/demo.py [--labelers knn prototype label_spreading hdl] [--seeds 0 1 2]

Encodes the 5,000 MNIST digits once (cached), then runs cluster -> pseudolabel ->
retrain per labeler and seed in this process, and prints a markdown table
(means over seeds) that the README's demo table comes from.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, markdown_table, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelers", nargs="+", default=["knn", "prototype", "label_spreading", "hdl"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--cache", default=str(REPO / "benchmarks" / "cache"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "demo.json"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.labeled_per_class=8")
    a = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from ssl_pipeline import pipeline

    results = []
    for lab in a.labelers:
        for seed in a.seeds:
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                cfg = compose("config", overrides=[f"pseudolabel={lab}", f"seed={seed}", f"paths.cache_dir={a.cache}",
                                                   *a.overrides])
            t = time.perf_counter()
            with tempfile.TemporaryDirectory() as d:
                m = pipeline.run(cfg, Path(d))
            results.append({"labeler": lab, "seed": seed, "seconds": time.perf_counter() - t, **m})
    rows = []
    for lab in a.labelers:
        r = [x for x in results if x["labeler"] == lab]

        def mean(k, r=r):
            return float(np.mean([x[k] for x in r if k in x]))

        rows.append([lab, mean("pseudolabel/accuracy"), mean("pseudolabel/accuracy_top50"),
                     mean("retrain/test_accuracy"), mean("retrain/labeled_only_test_accuracy"),
                     mean("pseudolabel/seconds")])
    print(f"\nDemo (MNIST 5,000, {len(a.seeds)} seeds, overrides: {' '.join(a.overrides) or 'none'})\n")
    print(markdown_table(["labeler", "pseudo-label acc", "top-50% acc", "retrain test acc",
                          "labeled-only test acc", "labeling s"], rows))
    write_json(a.out, {"overrides": a.overrides, "seeds": a.seeds, "runs": results})


if __name__ == "__main__":
    main()
