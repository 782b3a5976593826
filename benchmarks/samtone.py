"""retrain=head with loss=samtone against loss=ce on the shared CLIP embedding sets, same run.

For every set (``DATA/clip_vitb32/*.npz``) and seed ``s``: a deterministic stratified test split
(:func:`ssl_pipeline.data.table.stratified_test_split`, 20% of each class, seed ``s``), then
``labels`` labeled rows per class among the training rows
(:func:`ssl_pipeline.data.table.labeled_per_class_mask`, the BENCHMARKS.md protocol with seed ``s``).
The file is run through the package (``python -m ssl_pipeline`` equivalent:
``pipeline.run``) with ``data=embeddings retrain=head stage=retrain``, once per loss, in one cache,
so the encode, cluster and pseudolabel (HDL) artifacts are shared and only the head's loss differs.
Reported: test accuracy of the head trained on labeled + pseudo-labeled rows, of the labeled-only
head, and the retrain seconds. Validation folds are off (``val.folds=0``) to keep it CPU-sized.

    python benchmarks/samtone.py [--sets food10 ...] [--seeds 0 1 2] [--labels 4] [--steps 600]
                                 [--out benchmarks/results/samtone.json] [--override key=value ...]
    python benchmarks/samtone.py --table [--out FILE]

On a GPU: add ``--override trainer=gpu`` (the heads are small; the CPU is enough).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import embedding_sets, markdown_table, print_results_table, write_json  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
LOSSES = ("ce", "samtone")


def make_file(src: Path, dst: Path, labels: int, seed: int, test_fraction: float = 0.2) -> dict:
    """The benchmark's embeddings file: X, y (-1 = unlabeled), y_true, split; returns its sizes."""
    from ssl_pipeline.data.table import labeled_per_class_mask, stratified_test_split

    z = np.load(src)
    X, y = z["X"].astype(np.float32), z["y"].astype(np.int64)
    test = stratified_test_split(y, test_fraction, seed)
    lab = labeled_per_class_mask(y, ~test, labels, seed)
    np.savez(dst, X=X, y=np.where(lab, y, -1), y_true=y, split=np.where(test, "test", "train"))
    return {"n": len(y), "n_test": int(test.sum()), "n_labeled": int(lab.sum())}


def run_one(path: Path, cache: Path, run_dir: Path, loss: str, seed: int, steps: int, extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from ssl_pipeline import pipeline

    ov = ["data=embeddings", f"data.path={path}", "retrain=head", f"loss={loss}", "stage=retrain",
          f"seed={seed}", f"retrain.steps={steps}", "val.folds=0", f"paths.cache_dir={cache}", *extra]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=ov)
    return pipeline.run(cfg, run_dir)


KEEP = ("retrain/test_accuracy", "retrain/labeled_only_test_accuracy", "retrain/seconds",
        "pseudolabel/accuracy")


def tables(result: dict) -> str:
    head = ["set", "labels/class", "pseudo-label acc", "CE test acc", "SamToNe test acc", "SamToNe - CE (pts)",
            "CE labeled-only", "SamToNe labeled-only", "CE s", "SamToNe s"]
    rows, d = [], []
    for c in result["cells"]:
        mm = c["mean"]
        delta = 100 * (mm["samtone/retrain/test_accuracy"] - mm["ce/retrain/test_accuracy"])
        d.append(delta)
        rows.append([c["set"], result["labels"], mm["ce/pseudolabel/accuracy"], mm["ce/retrain/test_accuracy"],
                     mm["samtone/retrain/test_accuracy"], f"{delta:+.1f}",
                     mm["ce/retrain/labeled_only_test_accuracy"], mm["samtone/retrain/labeled_only_test_accuracy"],
                     f"{mm['ce/retrain/seconds']:.1f}", f"{mm['samtone/retrain/seconds']:.1f}"])
    lines = [f"retrain=head, loss=samtone vs loss=ce on HDL pseudo-labels (mean over seeds {result['seeds']}, "
             f"{result['steps']} steps, test split 20% per class)", "", markdown_table(head, rows)]
    if d:
        lines += ["", f"SamToNe - CE over {len(d)} sets: mean {np.mean(d):+.2f} pts, best {max(d):+.2f}, "
                      f"worst {min(d):+.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding clip_vitb32/")
    ap.add_argument("--sets", nargs="*", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--labels", type=int, default=4, help="labeled rows per class")
    ap.add_argument("--steps", type=int, default=600, help="retrain.steps (the head's optimizer steps)")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for both runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "samtone.json")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of --out")
    args = ap.parse_args(argv)
    if args.table:
        return print_results_table(args.out, tables)
    warnings.filterwarnings("ignore")
    logging.getLogger("ssl_pipeline").setLevel(logging.WARNING)
    files = embedding_sets(args.data, args.sets)
    if files is None:
        return 0
    result = {"seeds": args.seeds, "labels": args.labels, "steps": args.steps, "overrides": args.override,
              "cells": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for f in files:
            runs = []
            for seed in args.seeds:
                path = tmp / f"{f.stem}_{seed}.npz"
                sizes = make_file(f, path, args.labels, seed)
                r = dict(sizes)
                for loss in LOSSES:
                    m = run_one(path, tmp / "cache", tmp / f"run_{f.stem}_{seed}_{loss}", loss, seed, args.steps,
                                args.override)
                    r.update({f"{loss}/{k}": float(m[k]) for k in KEEP if k in m})
                runs.append(r)
                print(f"{f.stem} seed {seed}: ce {r['ce/retrain/test_accuracy']:.3f} samtone "
                      f"{r['samtone/retrain/test_accuracy']:.3f}", file=sys.stderr, flush=True)
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            result["cells"].append({"set": f.stem, "mean": mean, "runs": runs})
            write_json(args.out, result)
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
