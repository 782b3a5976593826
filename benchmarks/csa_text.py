"""CSA's semantic side: the alignment head's class queries from the class-name text embeddings vs prototype
queries, on real CLIP embedding mosaics with real CLIP text embeddings of the class names.

Data: ``make_mosaics`` of :mod:`benchmarks.unidec_mosaics` (mean of 2-4 real image embeddings of distinct
classes, L2-normalised; labels = their union; disjoint train / test image pools; ``--labeled-fraction`` of the
train mosaics labeled, every label with a labeled positive) over the three files of
../shared/data/clip_vitb32/text (caltech101_subset67 + oxford_pets_subset25 + cifar10_test500: 102 labels), each
with ``text`` (C x 512, the CLIP ViT-B/32 text embeddings of the class prompts), written into the mosaics file.

Runs, same file, same seed, one process, each ``python -m ssl_pipeline stage=retrain data=embeddings``:

* ``text``:        the default multi-label recipe; the file's ``text`` are the class queries (and class
                   embeddings) of the alignment head (``multilabel.text_embeddings=true``, the default; the head
                   then works in the 512-d image-text space, no token PCA);
* ``prototypes``:  the same head and input (``multilabel.token_dim=null``: no PCA either) with prototype queries
                   (``multilabel.text_embeddings=false``: labeled class means, learnable);
* ``prototypes_pca``: prototype queries at the recipe's default token PCA (256 dims), what a run without
                   ``text`` in the file does.

Reported: macro mAP, P@1, P@5 on the test mosaics, the labeled-only head, the pseudo-label mAP on the
unlabeled train mosaics, retrain seconds.

    python benchmarks/csa_text.py [--train 3000] [--test 1200] [--seed 0]
    python benchmarks/csa_text.py --table        # the README table from the JSON

CPU-sized (a few minutes at 1 thread). Writes benchmarks/results/csa_text.json.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import limit_threads, markdown_table, print_results_table, shared_data, write_json  # noqa: E402
from benchmarks.unidec_mosaics import cell, make_mosaics, run_pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "csa_text.json"
SOURCES = ("caltech101_subset67", "oxford_pets_subset25", "cifar10_test500")
RUNS = {"text": ["multilabel.text_embeddings=true"],
        "prototypes": ["multilabel.text_embeddings=false", "multilabel.token_dim=null"],
        "prototypes_pca": ["multilabel.text_embeddings=false"]}
LABELS = {"text": "class-name text queries", "prototypes": "prototype queries (same input, no PCA)",
          "prototypes_pca": "prototype queries, default token PCA 256"}


def table(res: dict) -> str:
    rows = [[LABELS[k], r["map"], r["p@1"], r["p@5"], r.get("labeled_only_map", "-"), r.get("pseudolabel_map", "-"),
             r["seconds"]] for k, r in res["runs"].items()]
    d = res["data"]
    head = ["CSA head", "macro mAP", "P@1", "P@5", "labeled-only mAP", "pseudo-label mAP", "retrain s"]
    return (f"Embedding mosaics with class-name text ({d['n_labels']} labels: {' + '.join(d['sources'])}; "
            f"{d['n_train']} train / {d['n_test']} test mosaics of 2-4 images, {d['n_labeled']} labeled; seed "
            f"{res['seed']}; {res['host']}, {res['threads']} thread):\n\n" + markdown_table(head, rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=1200)
    ap.add_argument("--labeled-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--data", default=None)
    ap.add_argument("--work", default=None, help="folder for the mosaics file and the pipeline cache (kept)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (0: library default)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    a = ap.parse_args(argv)
    if a.table:
        return print_results_table(a.out, table)
    limit_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    arr = make_mosaics(shared_data(a.data), a.train, a.test, a.labeled_fraction, a.seed, SOURCES,
                       "clip_vitb32/text")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="csa_text_"))
    work.mkdir(parents=True, exist_ok=True)
    f = work / "mosaics_text.npz"
    np.savez(f, **arr)
    runs = {k: cell(run_pipeline(f, work / "cache", work / k, f"seed={a.seed}", *RUNS[k])) for k in a.runs}
    res = {"seed": a.seed, "runs": runs, "host": f"{platform.machine()} CPU", "threads": a.threads,
           "data": {"n_labels": int(arr["Y"].shape[1]), "n_train": a.train, "n_test": a.test,
                    "n_labeled": int(arr["labeled"].sum()), "sources": list(SOURCES)}}
    write_json(a.out, res)
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
