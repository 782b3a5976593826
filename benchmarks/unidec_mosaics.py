"""UniDEC vs the default multi-label recipe (ASL) on real CLIP "embedding mosaics" with 202 (or 102) labels.

Embedding mosaics (``make_mosaics``, seeded)
    Source: the real CLIP ViT-B/32 image embeddings of ../shared/data/clip_vitb32/caltech101.npz
    (100 classes) and oxford_flowers.npz (102 classes, ids shifted by 100): 202 labels. Each class's
    images are split once into a train pool (70%) and a test pool (30%), so no source image is in both
    a train and a test mosaic. A mosaic draws k ~ U{2, 3, 4} distinct labels uniformly, one random image
    of each label from the pool of its split, and is the L2-normalised mean of their embeddings; its
    labels are the union (exactly k positives). ``--labeled-fraction`` (default 0.1) of the train
    mosaics are labeled, topped up so every label has a labeled positive
    (``ssl_pipeline.data.multilabel.draw_labeled_fraction``). No class-name text (the sources have none):
    the UniDEC label side starts from the labeled class means.
``--text``: the same generator over the three files of ../shared/data/clip_vitb32/text (caltech101_subset67 +
    oxford_pets_subset25 + cifar10_test500: 102 labels, the sources of ``benchmarks/csa_text.py``), whose
    ``text`` (C x 512 CLIP text embeddings of the class names) goes into the file: the default recipe's class
    queries and the UniDEC label table start from it. Defaults 3000 train / 1200 test mosaics (as csa_text.py),
    results in benchmarks/results/unidec_mosaics_text.json.

Runs, in one process on the same file and the same pipeline cache (encode, cluster and pseudolabel are
shared; only the retrain step differs), each ``python -m ssl_pipeline stage=retrain data=embeddings``:

* ``asl``:    the default multi-label recipe (CSA head on the pooled embedding as one token, ASL, class-aware
              pseudo-labels; ``loss=ce`` keeps it). Its ``retrain/test_map`` is the semi-supervised teacher.
* ``unidec``: ``loss=unidec``, the dual encoder + classifier trained with PSL and faiss hard negatives on the
              labeled + pseudo-labeled mosaics, the pseudo-labeled rows weighted by ``unlabeled_weight=auto``
              (chosen on the held-out labeled fold; the table lists the choice and its seconds are included).
* ``unidec_fixed``: ``loss=unidec`` with a fixed ``loss.unlabeled_weight`` (``--fixed 0.25``: the former default).
* ``psl``:    ``loss=psl`` (the DE head alone), with ``--psl``.
* ``bce``:    one-vs-rest logistic regression on the labeled mosaics only (sklearn; BCE, no pseudo-labels), a
              plain reference outside the pipeline.

Reported: macro mAP, P@1, P@5 on the test mosaics, the labeled-only variant of each pipeline run, seconds
(the retrain stage; asl also lists the shared pseudolabel stage's seconds).

    python benchmarks/unidec_mosaics.py [--train 4000] [--test 1500] [--seed 0] [--psl] [--text] [--fixed 0.25]
    python benchmarks/unidec_mosaics.py --table [--text]     # the README table from the JSON

CPU-sized; on a GPU machine the same script runs unchanged (the dual encoder trains on the CPU: it is small).
Writes benchmarks/results/unidec_mosaics.json (``--text``: unidec_mosaics_text.json; ``--out`` another file).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, markdown_table, shared_data, write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "unidec_mosaics.json"
RESULTS_TEXT = RESULTS.with_name("unidec_mosaics_text.json")
SOURCES = ("caltech101", "oxford_flowers")
TEXT_SOURCES = ("caltech101_subset67", "oxford_pets_subset25", "cifar10_test500")  # under clip_vitb32/text


def make_mosaics(data: Path, n_train: int, n_test: int, labeled_fraction: float, seed: int,
                 sources: tuple[str, ...] = SOURCES, subdir: str = "clip_vitb32") -> dict:
    """The embedding-mosaic arrays (X, Y, labeled, split, classes[, text]); see the module docstring.

    ``sources``: embeddings files under ``data/subdir`` whose classes are concatenated (ids shifted); when every
    source has ``text`` (C_s x D class-name embeddings, ../shared/data/clip_vitb32/text), the result has ``text``.
    """
    from ssl_pipeline.data.multilabel import draw_labeled_fraction

    rng = np.random.default_rng(seed)
    Xs, ys, texts, names, off = [], [], [], [], 0
    for name in sources:
        z = np.load(data / subdir / f"{name}.npz")
        Xs.append(z["X"].astype(np.float32))
        ys.append(z["y"].astype(np.int64) + off)
        n_c = int(z["y"].max()) + 1
        texts.append(z["text"].astype(np.float32) if "text" in z.files else None)
        cls = [str(c) for c in z["classes"]] if "classes" in z.files else [str(c) for c in range(n_c)]
        names += [f"{name.split('_')[0]}_{c}" for c in cls]
        off += n_c
    X, y = np.concatenate(Xs), np.concatenate(ys)
    C = off
    pools = {"train": [], "test": []}
    for c in range(C):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(0.7 * len(idx)))
        pools["train"].append(idx[:cut])
        pools["test"].append(idx[cut:])
    rows_X, rows_Y, split = [], [], []
    for part, n in (("train", n_train), ("test", n_test)):
        for _ in range(n):
            k = int(rng.integers(2, 5))
            labels = rng.choice(C, k, replace=False)
            v = np.mean([X[rng.choice(pools[part][c])] for c in labels], axis=0)
            rows_X.append(v / np.linalg.norm(v))
            yy = np.zeros(C, np.int8)
            yy[labels] = 1
            rows_Y.append(yy)
            split.append(part)
    Y, split = np.stack(rows_Y), np.array(split)
    labeled = draw_labeled_fraction(Y, split == "train", labeled_fraction, seed)
    out = {"X": np.stack(rows_X).astype(np.float32), "Y": Y, "labeled": labeled, "split": split,
           "classes": np.array(names)}
    if all(t is not None for t in texts):
        out["text"] = np.concatenate(texts).astype(np.float32)
    return out


def run_pipeline(path: Path, cache: Path, out: Path, *extra: str) -> dict:
    from hydra import compose, initialize_config_dir

    from ssl_pipeline import pipeline

    ov = ["stage=retrain", "data=embeddings", f"data.path={path}", f"paths.cache_dir={cache}", *extra]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=ov)
    return pipeline.run(cfg, out)


def bce_reference(a: dict) -> dict:
    from sklearn.linear_model import LogisticRegression

    from ssl_pipeline.multilabel.recipe import test_metrics

    t0 = time.perf_counter()
    lab, test = a["labeled"], a["split"] == "test"
    S = np.zeros((int(test.sum()), a["Y"].shape[1]), np.float32)
    for c in range(a["Y"].shape[1]):
        clf = LogisticRegression(C=10.0, max_iter=300).fit(a["X"][lab], a["Y"][lab, c])
        S[:, c] = clf.decision_function(a["X"][test])
    m = test_metrics(a["Y"][test], S)
    return {"map": m["retrain/test_map"], "p@1": m["retrain/test_p@1"], "p@5": m["retrain/test_p@5"],
            "seconds": round(time.perf_counter() - t0, 2)}


def cell(m: dict) -> dict:
    keys = {"map": "retrain/test_map", "p@1": "retrain/test_p@1", "p@5": "retrain/test_p@5",
            "labeled_only_map": "retrain/labeled_only_test_map", "labeled_only_p@1": "retrain/labeled_only_test_p@1",
            "labeled_only_p@5": "retrain/labeled_only_test_p@5", "seconds": "retrain/seconds",
            "pseudolabel_seconds": "pseudolabel/seconds", "pseudolabel_map": "pseudolabel/map",
            "map_de": "retrain/test_map_de", "map_clf": "retrain/test_map_clf",
            "hit_rate": "retrain/hard_negative_hit_rate", "n_refreshes": "retrain/n_refreshes",
            "unlabeled_weight": "retrain/unlabeled_weight",
            "unlabeled_weight_source": "retrain/unlabeled_weight_source",
            "val_seconds": "val/unlabeled_weight_seconds", "val_map": "val/retrain_map",
            "student": "retrain/student", "dual_encoder_map": "retrain/dual_encoder_test_map",
            "head_map": "retrain/head_test_map"}
    out = {k: m[v] for k, v in keys.items() if v in m}
    out.update({"val_map@" + k.split("@", 1)[1]: v for k, v in m.items() if k.startswith("val/map@")})
    return out


def table(res: dict) -> str:
    rows = []
    for name in ("asl", "unidec", "unidec_fixed", "psl", "bce"):
        if name not in res["runs"]:
            continue
        r = res["runs"][name]
        label = res["labels"][name]
        if "unlabeled_weight" in r:
            val = ", ".join(f"{k.split('=', 1)[1]}: {v:.3f}" for k, v in r.items() if k.startswith("val_map@"))
            label += f" (unlabeled_weight {r['unlabeled_weight']:g}, {r['unlabeled_weight_source']}" + \
                (f"; held-out mAP {val}" if val else "") + ")"
        if r.get("student"):  # the retrain's student over the head / dual encoder, chosen on the held-out folds
            alone = r.get("dual_encoder_map", r.get("head_map"))
            label += f"; student {r['student']}" + (f", {alone:.3f} without it" if alone is not None else "")
        rows.append([label, r["map"], r["p@1"], r["p@5"], r.get("labeled_only_map", "-"), r["seconds"]])
    head = ["method", "macro mAP", "P@1", "P@5", "labeled-only mAP", "retrain s"]
    d = res["data"]
    text = " (class-name text in the file)" if d.get("text") else ""
    return (f"Embedding mosaics from real CLIP ViT-B/32 embeddings ({d['n_labels']} labels: "
            f"{' + '.join(d['sources'])}{text}; {d['n_train']} train / {d['n_test']} test mosaics of 2-4 images, "
            f"{d['n_labeled']} labeled; seed {res['seed']}; {res['host']}):\n\n" + markdown_table(head, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=None, help="train mosaics (default 4000; --text: 3000)")
    ap.add_argument("--test", type=int, default=None, help="test mosaics (default 1500; --text: 1200)")
    ap.add_argument("--text", action="store_true", help="the 102-label mosaics of clip_vitb32/text, with text")
    ap.add_argument("--labeled-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--psl", action="store_true", help="also run loss=psl")
    ap.add_argument("--fixed", type=float, default=None, metavar="W",
                    help="also run loss=unidec with the fixed loss.unlabeled_weight=W (e.g. 0.25, the former default)")
    ap.add_argument("--no-bce", action="store_true")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="results file (default results/unidec_mosaics.json; --text: "
                                                "results/unidec_mosaics_text.json)")
    ap.add_argument("--work", default=None, help="folder for the mosaics file and the pipeline cache (kept: a "
                                                 "rerun with the same arguments reuses finished stages)")
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    a = ap.parse_args()
    a.out = a.out or str(RESULTS_TEXT if a.text else RESULTS)
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))
        return
    a.train = a.train or (3000 if a.text else 4000)
    a.test = a.test or (1200 if a.text else 1500)
    sources, subdir = (TEXT_SOURCES, "clip_vitb32/text") if a.text else (SOURCES, "clip_vitb32")
    logging.basicConfig(level=logging.WARNING)
    import platform

    data = shared_data(a.data)
    arr = make_mosaics(data, a.train, a.test, a.labeled_fraction, a.seed, sources, subdir)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="unidec_mosaics_"))
    work.mkdir(parents=True, exist_ok=True)
    f = work / "mosaics.npz"
    np.savez(f, **arr)
    seed = [f"seed={a.seed}"]
    runs, labels = {}, {"asl": "default recipe (loss=ce): CSA head + ASL", "unidec": "loss=unidec",
                        "psl": "loss=psl", "bce": "BCE: one-vs-rest logistic regression, labeled only"}
    runs["asl"] = cell(run_pipeline(f, work / "cache", work / "asl", *seed))
    runs["unidec"] = cell(run_pipeline(f, work / "cache", work / "unidec", "loss=unidec", *seed))
    if a.fixed is not None:
        labels["unidec_fixed"] = "loss=unidec"
        runs["unidec_fixed"] = cell(run_pipeline(f, work / "cache", work / "unidec_fixed", "loss=unidec",
                                                 f"loss.unlabeled_weight={a.fixed}", *seed))
    if a.psl:
        runs["psl"] = cell(run_pipeline(f, work / "cache", work / "psl", "loss=psl", *seed))
    if not a.no_bce:
        runs["bce"] = bce_reference(arr)
    res = {"seed": a.seed, "runs": runs, "labels": labels, "host": f"{platform.machine()} CPU",
           "data": {"n_labels": int(arr["Y"].shape[1]), "n_train": a.train, "n_test": a.test,
                    "n_labeled": int(arr["labeled"].sum()), "labeled_fraction": a.labeled_fraction,
                    "sources": list(sources), "text": "text" in arr, "mean_labels": float(arr["Y"].sum(1).mean())}}
    write_json(a.out, res)
    print(table(res))


if __name__ == "__main__":
    main()
