"""UniDEC on a synthetic extreme multi-label problem: ANN hard negatives vs in-batch negatives.

Synthetic data (``make_data``, fixed seed 0 unless ``--seed``)
    * ``L`` labels (default 10,000) with D_in = 64 features: ``L // labels_per_cluster``
      cluster centres (default 1,000) drawn as random unit vectors; each label is
      assigned to a random centre and is that centre plus Gaussian noise of norm
      about ``label_spread`` (0.5), renormalised. Labels of one cluster have cosine
      about 0.8 to each other: they are the confusable, hard negatives.
    * Each query has 1 to 5 positive labels: a uniformly drawn first label, then
      more labels, each from the first label's cluster with probability 0.6 and
      uniformly from all labels otherwise. Its features are
      ``M @ normalize(sum of its label vectors) + noise``, where ``M`` is a fixed
      random mixing matrix (a rotation times scales log-uniform in [1/4, 4]: a
      "modality gap" the query encoder must learn to undo) and the Gaussian noise
      has norm about ``query_noise`` (0.2) times the RMS scale of ``M``.

Model (a stand-in for UniDEC's shared backbone and two heads)
    query encoder Linear(D_in, h), label encoder Linear(D_in, h), shared DE head
    Linear(h, d) (outputs normalised inside the loss), classifier head
    Linear(h, d) scored against one weight row per label (owned by ``UniDECLoss``).

Training: the same seed, data, batches and steps for every variant
    AdamW; ``UniDECLoss`` = PSL on the DE head + lambda * PSL on the classifier head,
    at most ``beta`` sampled positives per query. The batch label pool is the
    union of the batch's positives (``in_batch``), plus ``eta`` negatives per query,
    either drawn uniformly from all labels (``random``, a control with the same pool
    size) or sampled from the query's hard-negative shortlist (``ann``:
    ``HardNegativeMiner``, the ``K`` nearest non-positive labels under the current
    DE head, built after ``warmup_epochs`` in-batch epochs and refreshed every
    ``refresh_every`` epochs).

Evaluation: exact retrieval over all L labels for held-out queries with the DE
head, P@1 and P@5; also the classifier head alone. A closed-form reference:
least squares from the query features to the clean label mix, scored by cosine.

Run:  python benchmarks/unidec_synthetic.py [--labels 10000] [--epochs 8] [--quick]
Writes benchmarks/results/unidec_synthetic.json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_pipeline.models.hard_negatives import HardNegativeMiner
from ssl_pipeline.models.losses import UniDECLoss

RESULTS = Path(__file__).resolve().parent / "results" / "unidec_synthetic.json"
VARIANTS = {
    "in_batch": "in-batch negatives",
    "random": "in-batch + random negatives",
    "ann": "in-batch + ANN hard negatives",
}


# -- data ----------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_data(n_labels: int, n_train: int, n_test: int, dim: int = 64, labels_per_cluster: int = 10,
              label_spread: float = 0.5, query_noise: float = 0.2, max_labels: int = 5, seed: int = 0) -> dict:
    """Clustered label vectors and multi-label queries; see the module docstring."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n_labels // labels_per_cluster)
    centres = _unit(rng.normal(size=(n_clusters, dim)))
    cluster = rng.integers(0, n_clusters, size=n_labels)
    labels = _unit(centres[cluster] + label_spread * rng.normal(size=(n_labels, dim)) / math.sqrt(dim))
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    # fixed mixing matrix: random rotation times log-uniform scales in [1/4, 4]
    rot, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    mix = rot * np.exp(rng.uniform(np.log(0.25), np.log(4.0), size=dim))[None, :]

    def queries(n: int) -> tuple[np.ndarray, list[np.ndarray]]:
        pos = []
        for _ in range(n):
            first = int(rng.integers(n_labels))
            ids = {first}
            for _ in range(int(rng.integers(1, max_labels + 1)) - 1):
                if rng.random() < 0.6:
                    ids.add(int(rng.choice(members[cluster[first]])))
                else:
                    ids.add(int(rng.integers(n_labels)))
            pos.append(np.array(sorted(ids), np.int64))
        clean = np.stack([_unit(labels[p].sum(0)) for p in pos])
        rms_scale = np.linalg.norm(mix) / math.sqrt(dim)
        x = clean @ mix.T + query_noise * rms_scale * rng.normal(size=(n, dim)) / math.sqrt(dim)
        return x.astype(np.float32), pos

    x_tr, p_tr = queries(n_train)
    x_te, p_te = queries(n_test)
    return {"labels": labels.astype(np.float32), "x_train": x_tr, "pos_train": p_tr, "x_test": x_te, "pos_test": p_te,
            "n_clusters": n_clusters}


# -- model ---------------------------------------------------------------------------------


class DualHead(nn.Module):
    """Linear query / label encoders, a shared DE head and a classifier head."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.query_enc = nn.Linear(dim_in, hidden)
        self.label_enc = nn.Linear(dim_in, hidden)
        self.de_head = nn.Linear(hidden, dim_out)
        self.clf_head = nn.Linear(hidden, dim_out)

    def queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.query_enc(x)
        return self.de_head(h), self.clf_head(h)

    def labels(self, t: torch.Tensor) -> torch.Tensor:
        return self.de_head(self.label_enc(t))


def precision_at(scores: torch.Tensor, positives: list[np.ndarray], ks=(1, 5)) -> dict[str, float]:
    top = scores.topk(max(ks), dim=1).indices.numpy()
    out = {}
    for k in ks:
        hits = [len(np.intersect1d(top[i, :k], positives[i], assume_unique=False)) / k for i in range(len(top))]
        out[f"p@{k}"] = float(np.mean(hits))
    return out


@torch.no_grad()
def evaluate(model: DualHead, loss_fn: UniDECLoss, data: dict) -> dict[str, float]:
    labels = torch.from_numpy(data["labels"])
    q_de, q_clf = model.queries(torch.from_numpy(data["x_test"]))
    lab = nn.functional.normalize(model.labels(labels), dim=-1)
    de = precision_at(nn.functional.normalize(q_de, dim=-1) @ lab.T, data["pos_test"])
    clf = precision_at(q_clf @ loss_fn.classifier.weight.T, data["pos_test"])
    return {"de_p@1": de["p@1"], "de_p@5": de["p@5"], "clf_p@1": clf["p@1"], "clf_p@5": clf["p@5"]}


# -- training ------------------------------------------------------------------------------


def train(data: dict, variant: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    labels = torch.from_numpy(data["labels"])
    x_train = torch.from_numpy(data["x_train"])
    pos_train = data["pos_train"]
    n_labels, dim_in = labels.shape
    model = DualHead(dim_in, args.hidden, args.dim)
    loss_fn = UniDECLoss(num_labels=n_labels, clf_dim=args.dim, lam=args.lam, tau_de=args.tau,
                         max_pos_per_query=args.beta, seed=args.seed)
    opt = torch.optim.AdamW([{"params": model.parameters()},
                             {"params": loss_fn.parameters(), "lr": args.lr * args.clf_lr_mult}],
                            lr=args.lr, weight_decay=1e-4)
    miner = HardNegativeMiner(refresh_every=args.refresh_every, hnsw_threshold=args.hnsw_threshold)
    shortlist = None
    history = []
    t0 = time.perf_counter()
    mine_s = 0.0
    for epoch in range(args.epochs):
        if variant == "ann" and epoch >= args.warmup_epochs and miner.should_refresh(epoch - args.warmup_epochs):
            tm = time.perf_counter()
            with torch.no_grad():
                lab_emb = model.labels(labels).numpy()
                q_emb = model.queries(x_train)[0].numpy()
            miner.refresh(lab_emb)
            shortlist = miner.mine(q_emb, pos_train, n_neg=args.shortlist)
            mine_s += time.perf_counter() - tm
            history.append({"epoch": epoch, **miner.last_stats_})
        order = rng.permutation(len(x_train))
        total, pool_sizes = 0.0, []
        for s in range(0, len(order), args.batch_size):
            idx = order[s:s + args.batch_size]
            if variant == "random":          # control: as many extra negatives, drawn uniformly
                hard = rng.integers(0, n_labels, size=(len(idx), args.eta))
            else:
                hard = shortlist[idx] if shortlist is not None else None
            pool, pos = miner.batch_pool([pos_train[i] for i in idx], hard, n_per_query=args.eta, rng=rng)
            pool_t = torch.from_numpy(pool)
            q_de, q_clf = model.queries(x_train[idx])
            loss = loss_fn(q_de, model.labels(labels[pool_t]), torch.from_numpy(pos), q_clf=q_clf, pool_ids=pool_t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            pool_sizes.append(len(pool))
        if args.verbose:
            print(f"  [{variant}] epoch {epoch}: loss {total / len(order):.4f}, mean pool {np.mean(pool_sizes):.0f}")
    wall = time.perf_counter() - t0
    return {"variant": variant, **evaluate(model, loss_fn, data), "train_wall_s": wall, "mining_wall_s": mine_s,
            "refreshes": miner.n_refreshes_, "mean_pool_size": float(np.mean(pool_sizes)), "miner_history": history}


def least_squares_reference(data: dict) -> dict[str, float]:
    """Closed form, no contrastive training: least squares from x to the clean label mix."""
    clean = np.stack([_unit(data["labels"][p].sum(0)) for p in data["pos_train"]])
    w, *_ = np.linalg.lstsq(data["x_train"], clean, rcond=None)
    s = torch.from_numpy(_unit(data["x_test"] @ w).astype(np.float32)) @ torch.from_numpy(data["labels"]).T
    r = precision_at(s, data["pos_test"])
    return {"de_p@1": r["p@1"], "de_p@5": r["p@5"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", type=int, default=10_000)
    ap.add_argument("--train", type=int, default=30_000, help="training queries")
    ap.add_argument("--test", type=int, default=2_000, help="held-out queries")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--query-noise", type=float, default=0.2, help="query noise, relative to the signal")
    ap.add_argument("--labels-per-cluster", type=int, default=10, help="mean cluster size of the label space")
    ap.add_argument("--label-spread", type=float, default=0.5, help="label spread around its cluster centre")
    ap.add_argument("--quick", action="store_true", help="smaller run for a smoke test (< 1 min)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--tau", type=float, default=0.05, help="DE temperature")
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the classifier PSL loss")
    ap.add_argument("--beta", type=int, default=3, help="max sampled positives per query")
    ap.add_argument("--eta", type=int, default=4, help="hard negatives per query in the batch pool")
    ap.add_argument("--shortlist", type=int, default=24, help="hard-negative shortlist length K")
    ap.add_argument("--refresh-every", type=int, default=2, help="epochs between index refreshes")
    ap.add_argument("--warmup-epochs", type=int, default=1, help="in-batch epochs before the first index build")
    ap.add_argument("--clf-lr-mult", type=float, default=10.0, help="learning-rate multiplier of the classifier rows")
    ap.add_argument("--hnsw-threshold", type=int, default=100_000, help="labels above which HNSW replaces flat")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (small matmuls: 1 is fastest)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.test = min(args.train, 8_000), min(args.test, 1_000)
        args.epochs = min(args.epochs, 3)
        args.refresh_every = min(args.refresh_every, 1)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data = make_data(args.labels, args.train, args.test, query_noise=args.query_noise,
                     label_spread=args.label_spread, labels_per_cluster=args.labels_per_cluster, seed=args.seed)
    gen_s = time.perf_counter() - t0
    print(f"synthetic XMC: {args.labels} labels in {data['n_clusters']} clusters, {args.train} train / "
          f"{args.test} test queries, {np.mean([len(p) for p in data['pos_train']]):.2f} labels per query "
          f"(generated in {gen_s:.1f} s)")
    results = {"least_squares": least_squares_reference(data)}
    for variant in VARIANTS:
        results[variant] = train(data, variant, args)

    rows = [("reference: least squares to the label mix", results["least_squares"], None)]
    rows += [(f"UniDEC, {VARIANTS[v]}", results[v], results[v]["train_wall_s"]) for v in VARIANTS]
    print(f"\n{'method':44s} {'DE P@1':>7s} {'DE P@5':>7s} {'CLF P@1':>8s} {'CLF P@5':>8s} {'train s':>8s}")
    for name, r, wall in rows:
        clf1 = f"{r['clf_p@1']:8.4f}" if "clf_p@1" in r else f"{'-':>8s}"
        clf5 = f"{r['clf_p@5']:8.4f}" if "clf_p@5" in r else f"{'-':>8s}"
        w = f"{wall:8.1f}" if wall is not None else f"{'-':>8s}"
        print(f"{name:44s} {r['de_p@1']:7.4f} {r['de_p@5']:7.4f} {clf1} {clf5} {w}")
    ann = results["ann"]
    print()
    for base in ("in_batch", "random"):
        b = results[base]
        diff = {k: ann[k] - b[k] for k in ("de_p@1", "de_p@5", "clf_p@1", "clf_p@5")}
        results[f"ann_minus_{base}"] = diff
        print(f"ANN hard negatives vs {VARIANTS[base]}: DE P@1 {diff['de_p@1']:+.4f}, P@5 {diff['de_p@5']:+.4f}; "
              f"CLF P@1 {diff['clf_p@1']:+.4f}, P@5 {diff['clf_p@5']:+.4f}; "
              f"train time x{ann['train_wall_s'] / b['train_wall_s']:.2f}")
    print(f"ANN: {ann['refreshes']} index refreshes, {ann['mining_wall_s']:.1f} s embedding + mining")
    for h in ann["miner_history"]:
        print(f"  refresh at epoch {h['epoch']}: hit rate {h['hit_rate']:.3f}, R-precision {h['r_precision']:.3f}")
    total = time.perf_counter() - t0
    print(f"total wall time {total:.1f} s")

    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "data": {"n_labels": args.labels, "n_clusters": data["n_clusters"], "n_train": args.train,
                       "n_test": args.test, "dim": int(data["labels"].shape[1])},
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "results": results, "total_wall_s": total}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
