"""CIFAR-10 (JPEG) end to end through the pipeline: labeled-only vs pseudo-labeled retrain vs 2 rounds.

    python benchmarks/cifar10.py [--labels 4 10 25] [--pool-per-class 500] [--seed 0] [OVERRIDES ...]

Data: ``../shared/data/images/cifar10-jpeg.tar.gz`` is extracted once to
``~/.cache/ssl_pipeline/data/cifar10`` (never into the repository). The training pool is a seeded
subset of the 50,000 training images, ``--pool-per-class`` per class (default 500, so 5,000
images: what fits two CPU cores), linked (symlinks) into ``cifar10-pool<N>-seed<S>/<class>/``;
the test set is all 10,000 test images, or ``--test-per-class`` per class (a seeded subset; the
JSON records ``test_images``).

Per labels-per-class setting one pipeline run (``ssl_pipeline.pipeline.run`` on composed
configs, so the product is what is measured) with ``retrain=finetune retrain.rounds=2``. It
reports, on the 10,000 test images:

* labeled-only: the fine-tuning recipe on the labeled images only (same seed, same steps);
* 1 round: labeled + pseudo-labeled images (``retrain/round1/test_accuracy``; the stage is
  deterministic, so this is exactly what a ``retrain.rounds=1`` run gives);
* 2 rounds: re-encoded with the round-1 tower, re-labeled, retrained.

Artifacts (embeddings, the frozen-prefix view bank, retrained models) are cached in
``--cache`` (default ``~/.cache/ssl_pipeline/bench``), so a rerun is cheap. Prints a markdown
table and writes ``benchmarks/results/cifar10.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import REPO, extract_archive, markdown_table, shared_data, write_json  # noqa: E402

HOME_CACHE = Path.home() / ".cache" / "ssl_pipeline"



def pool_subset(train: Path, per_class: int, seed: int, dest: Path) -> Path:
    """``dest/<class>/`` with symlinks to a seeded ``per_class`` subset of each class of ``train``."""
    if not (dest / ".ok").exists():
        rng = np.random.default_rng(seed)
        for c in sorted(p for p in train.iterdir() if p.is_dir()):
            files = sorted(c.iterdir())
            pick = sorted(rng.choice(len(files), min(per_class, len(files)), replace=False))
            (dest / c.name).mkdir(parents=True, exist_ok=True)
            for i in pick:
                link = dest / c.name / files[i].name
                if not link.exists():
                    os.symlink(files[i], link)
        (dest / ".ok").touch()
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="the shared data folder (default ../shared/data)")
    ap.add_argument("--labels", nargs="+", type=int, default=[4, 10, 25])
    ap.add_argument("--pool-per-class", type=int, default=500)
    ap.add_argument("--test-per-class", type=int, default=0, help="a seeded test subset per class (0 = all 10,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache", default=str(HOME_CACHE / "bench"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cifar10.json"))
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. pseudolabel=hdl retrain.steps=400")
    a = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from ssl_pipeline import pipeline

    archive = shared_data(a.data) / "images" / "cifar10-jpeg.tar.gz"
    root = extract_archive(archive, HOME_CACHE / "data" / "cifar10")
    pool = pool_subset(root / "train", a.pool_per_class, a.seed,
                       HOME_CACHE / "data" / f"cifar10-pool{a.pool_per_class}-seed{a.seed}")
    test = root / "test"
    if a.test_per_class:
        test = pool_subset(test, a.test_per_class, a.seed,
                           HOME_CACHE / "data" / f"cifar10-test{a.test_per_class}-seed{a.seed}")
    n_test = sum(1 for c in test.iterdir() if c.is_dir() for _ in c.iterdir())
    runs = []
    for n in a.labels:
        ov = ["data=image_folder", f"data.root={pool}", f"data.test_root={test}",
              f"data.labeled_per_class={n}", f"seed={a.seed}", "retrain=finetune", f"retrain.rounds={a.rounds}",
              f"paths.cache_dir={a.cache}", *a.overrides]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=ov)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            m = pipeline.run(cfg, Path(d))
        runs.append({"labels_per_class": n, "seconds": round(time.perf_counter() - t, 1), "overrides": ov, **m})
        write_json(a.out, {"pool_per_class": a.pool_per_class, "test_images": n_test, "seed": a.seed,
                           "overrides": a.overrides, "runs": runs})
    header = ["labels/class", "pseudo-label acc", "labeled-only", "1 round", f"{a.rounds} rounds",
              "gain (1 round)", f"gain ({a.rounds} rounds)", "seconds"]
    rows = []
    for r in runs:
        lo = r["retrain/labeled_only_test_accuracy"]
        r1, rN = r["retrain/round1/test_accuracy"], r["retrain/test_accuracy"]
        rows.append([r["labels_per_class"], r.get("pseudolabel/accuracy", float("nan")), lo, r1, rN,
                     f"{100 * (r1 - lo):+.1f} pts", f"{100 * (rN - lo):+.1f} pts", r["seconds"]])
    print(f"\nCIFAR-10 JPEG, train pool {a.pool_per_class}/class (seed {a.seed}), test {n_test:,} images, "
          f"overrides: {' '.join(a.overrides) or 'none'}\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
