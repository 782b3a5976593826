"""retrain.mode=head: a linear/MLP head on the cached embeddings, with and without the pseudo-labels.

The labeled-only head is trained first. ``retrain.pseudo_targets=auto`` (default) picks how the
pseudo-labeled head uses the pseudo-labels (among ``retrain.candidates``: by default every trusted
pseudo-label, the top half per class, or soft targets) by the held-out score of ``retrain.choose_by`` (log-loss by
default) on the validation folds (:mod:`ssl_pipeline.retrain.recipes`); ``soft``: the labeler's label (as a
distribution with its confidence on it) times the labeled-only head's posterior; ``hard``: the label.
Runs on ``cfg.trainer`` (``trainer=ddp trainer.devices=N``: N processes, each taking its share of
every global batch).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.engine import make_trainer, rank_slice
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.models.module import HeadModule
from ssl_pipeline.retrain import recipes
from ssl_pipeline.retrain.common import make_logger, test_positions

log = logging.getLogger(__name__)


class _Threads:
    """``with _Threads(n):`` torch's intra-op threads capped at ``n`` (0 = unchanged), restored on exit.

    A head on embeddings multiplies (batch x D) by (D x C): too small to gain from threads, and on a
    busy CPU the threads' spin-waits make it many times slower (measured on 2 shared cores: 600 steps
    of a 1280 -> 10 head in 31 s with 2 threads, 1.8 s with 1).
    """

    def __init__(self, n: int):
        self.n = int(n or 0)

    def __enter__(self):
        self.old = torch.get_num_threads()
        if 0 < self.n < self.old:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
        return False


def fit_ensemble(X: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int, cfg: DictConfig, seed: int,
                 log_dir: Path | None = None, name: str = "head", stats=None, targets=None) -> HeadModule:
    """``retrain.ensemble`` heads (seeds ``seed``, ``seed + 1``, ...) on the same data, averaged into one head.

    A linear head's logits are linear in its weights, so the head with the averaged weight and bias
    gives the averaged logits of the members: one head to export, with less of the seed-to-seed
    variance of a head trained on a few labels (other head kinds: ConfigError for ``ensemble > 1``).
    The first member logs under ``name``. Shapes as :func:`fit_head`.
    """
    n = int(cfg.retrain.get("ensemble", 1) or 1)
    if n < 1:
        raise ConfigError("retrain.ensemble", f"must be >= 1, got {n}")
    if n > 1 and str(cfg.retrain.head) != "linear":
        raise ConfigError("retrain.ensemble", f"averages linear heads only (retrain.head={cfg.retrain.head}); "
                                              "set retrain.ensemble=1")
    first = fit_head(X, y, w, n_classes, cfg, seed, log_dir, name, stats, targets)
    if n == 1:
        return first
    members = [first] + [fit_head(X, y, w, n_classes, cfg, seed + i, None, name, stats, targets) for i in range(1, n)]
    with torch.no_grad():
        for key, t in first.head.state_dict().items():
            t.copy_(torch.stack([m.head.state_dict()[key] for m in members]).mean(0))
    return first


def fit_head(X: np.ndarray, y: np.ndarray, w: np.ndarray, n_classes: int, cfg: DictConfig, seed: int,
             log_dir: Path | None = None, name: str = "head",
             stats: tuple[np.ndarray, np.ndarray] | None = None, targets: np.ndarray | None = None) -> HeadModule:
    """Train a :class:`HeadModule` for ``retrain.steps`` optimizer steps with Lightning; return it (eval mode).

    ``X`` (N, D), ``y`` (N,), ``w`` (N,); ``stats`` = (mean (D,), std (D,)) standardising the inputs
    (default: those of ``X``); ``targets`` (N, C): soft targets instead of ``y``.
    """
    rcfg = cfg.retrain
    with _Threads(int(rcfg.get("num_threads", 1) or 0)):
        return _fit_head(X, y, w, n_classes, cfg, seed, log_dir, name, stats, targets)


class StepBatches(torch.utils.data.Dataset):
    """Item ``b``: this DDP rank's share of global batch ``b`` (``batch_size`` rows drawn with replacement,
    seeded), as ``(x, y, w[, q], w_total)``; ``w_total`` is the global batch's weight sum, so that the
    ranks' weighted means average to the global one (no collective needed). N processes take the
    same optimizer steps as one. The rank is read at the first item (after Lightning set up DDP).
    """

    def __init__(self, tensors: list[torch.Tensor], steps: int, batch_size: int, seed: int):
        self.tensors, self.steps, self.bs = tensors, int(steps), int(batch_size)
        # the draws of torch's RandomSampler(replacement=True) with this seed (chunks of 32), batch by batch
        g = torch.Generator().manual_seed(int(seed))
        n, total = len(tensors[0]), self.steps * self.bs
        idx = [torch.randint(n, (32,), dtype=torch.int64, generator=g) for _ in range(total // 32)]
        if total % 32:
            idx.append(torch.randint(n, (total % 32,), dtype=torch.int64, generator=g))
        self.idx = (torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)).reshape(self.steps, self.bs)
        self.share = None

    def _share(self) -> tuple[int, int]:
        if self.share is None:
            d = torch.distributed
            rank, world = (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)
            self.share = rank_slice(self.bs, rank, world)
        return self.share

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, b: int):
        lo, hi = self._share()
        rows = self.idx[b]
        w_total = self.tensors[2][rows].sum()
        return (*(t[rows[lo:hi]] for t in self.tensors), w_total)


def _fit_head(X, y, w, n_classes, cfg, seed, log_dir, name, stats, targets) -> HeadModule:
    import lightning as L

    rcfg = cfg.retrain
    L.seed_everything(seed, workers=True, verbose=False)
    tensors = [torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(w)]
    if targets is not None:
        tensors.append(torch.from_numpy(np.asarray(targets, np.float32)))
    steps = int(rcfg.steps)
    # `steps` batches drawn with replacement: the same number of optimizer steps whatever the training-set
    # size (a labeled-only set of 40 gets as many updates as 4,000 pseudo-labels)
    loader = torch.utils.data.DataLoader(StepBatches(tensors, steps, int(rcfg.batch_size), seed), batch_size=None,
                                         shuffle=False)
    loss = instantiate(cfg.loss) if "_target_" in cfg.loss else None
    module = HeadModule(X.shape[1], n_classes, head=rcfg.head, hidden=int(rcfg.hidden), lr=float(rcfg.lr),
                        weight_decay=float(rcfg.weight_decay), dropout=float(rcfg.get("dropout", 0.0)), loss=loss,
                        max_steps=steps, **_standardiser(X, stats, rcfg))
    logger = make_logger(rcfg, log_dir, name)
    trainer = make_trainer(cfg.get("trainer"), max_steps=steps, max_epochs=-1, logger=logger,
                           enable_checkpointing=False, log_every_n_steps=int(rcfg.get("log_every", 50)),
                           limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, loader)
    module.world_size = int(trainer.world_size)
    return module.cpu().eval()


def feature_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (D,) of ``X`` (N, D), in float64 then float32."""
    X = np.asarray(X, np.float64)
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    return mean.astype(np.float32), np.maximum(std, 1e-3 * max(float(std.mean()), 1e-12)).astype(np.float32)


def _standardiser(X: np.ndarray, stats, rcfg: DictConfig) -> dict:
    if not rcfg.get("standardize", True):
        return {}
    mean, std = stats if stats is not None else feature_stats(X)
    return {"feature_mean": torch.from_numpy(mean), "feature_std": torch.from_numpy(std)}


@torch.no_grad()
def accuracy(module: HeadModule, X: np.ndarray, y: np.ndarray) -> float:
    pred = module(torch.from_numpy(X)).argmax(-1).numpy()
    return float((pred == y).mean())


def run_head(cfg: DictConfig, table: SampleTable, store, pl_dir: Path, run_dir: Path) -> tuple[dict, dict]:
    """Train the labeled-only and the pseudo-labeled heads; return (metrics, state dicts).

    ``retrain.pseudo_targets=auto``: the recipe (how much the head trusts the pseudo-labels) is the
    candidate of ``retrain.candidates`` with the best held-out score (``retrain.choose_by``) on the validation folds
    (:mod:`ssl_pipeline.retrain.recipes`); hard / soft: that fixed recipe.
    """
    rcfg = cfg.retrain
    emb = store.load()
    pos_of = {int(r): i for i, r in enumerate(store.rows)}

    def embed(rows):
        return emb[[pos_of[int(r)] for r in rows]]

    n_classes = len(table.classes)
    y_true = np.asarray(table.y_true)
    test_pos = test_positions(table, store)
    seed = int(cfg.seed)
    # every head standardises with the statistics of every training-split embedding (no labels involved)
    stats = feature_stats(emb[np.flatnonzero(np.asarray(table.train)[store.rows])])
    metrics: dict = {}
    if str(rcfg.get("pseudo_targets", "hard")) == "auto":
        recipe, metrics = select_recipe(cfg, pl_dir, embed, n_classes, stats)
    else:
        recipe = recipes.fixed_recipe(rcfg)
    arrs = recipes.load_arrays(pl_dir)
    lab = arrs["labeled"].astype(bool)
    lab_only = fit_ensemble(embed(arrs["rows"][lab]), arrs["labels"][lab].astype(np.int64),
                            np.ones(int(lab.sum()), np.float32), n_classes, cfg, seed, run_dir / "retrain_logs",
                            "labeled_only", stats)
    d = recipes.training_data(arrs, recipe, rcfg, embed, _logits_of(lab_only), n_classes)
    rows, labels, w, is_pseudo = d["rows"], d["labels"], d["w"], d["is_pseudo"]
    log.info("retrain: head (recipe %s) on %d samples (%d pseudo-labeled) vs %d labeled only", recipe.name,
             len(rows), int(is_pseudo.sum()), int(lab.sum()))
    semi = fit_ensemble(d["X"], labels, w, n_classes, cfg, seed, run_dir / "retrain_logs", "semi_supervised", stats,
                        d["targets"])
    metrics.update({"retrain/recipe": recipe.name, "retrain/ensemble": int(rcfg.get("ensemble", 1) or 1),
                    "retrain/world_size": int(getattr(semi, "world_size", 1)),
                    "retrain/n_train": len(rows), "retrain/n_pseudo": int(is_pseudo.sum()),
                    "retrain/pseudo_weight_mean": float(w[is_pseudo].mean()) if is_pseudo.any() else 0.0})
    y_rows = y_true[rows]
    if is_pseudo.any() and (y_rows[is_pseudo] >= 0).any():
        k = is_pseudo & (y_rows >= 0)
        metrics["retrain/used_pseudolabel_accuracy"] = float((labels[k] == y_rows[k]).mean())
        if d["targets"] is not None:
            metrics["retrain/soft_target_mass_on_truth"] = float(d["targets"][k, y_rows[k]].mean())
    if len(test_pos):
        Xt, yt = emb[test_pos], y_true[store.rows[test_pos]]
        metrics["retrain/test_accuracy"] = accuracy(semi, Xt, yt)
        metrics["retrain/labeled_only_test_accuracy"] = accuracy(lab_only, Xt, yt)
        metrics["retrain/n_test"] = len(test_pos)
        for module, k in ((semi, "retrain/test_accuracy"), (lab_only, "retrain/labeled_only_test_accuracy")):
            lg = module.logger if module._trainer is not None else None
            if lg:  # the final test accuracy as val/acc, next to train/loss and pseudo/weight_mean
                lg.log_metrics({"val/acc": metrics[k]}, step=int(rcfg.steps))
                lg.save()
    return metrics, {"head.pt": semi.state_dict(), "head_labeled_only.pt": lab_only.state_dict()}


def _logits_of(module: HeadModule):
    @torch.no_grad()
    def f(X: np.ndarray) -> np.ndarray:
        return module(torch.from_numpy(X)).numpy()

    return f


def select_recipe(cfg: DictConfig, pl_dir: Path, embed, n_classes: int, stats) -> tuple[recipes.Recipe, dict]:
    """The candidate recipe with the best held-out score (``retrain.choose_by``: log-loss or accuracy) over the
    validation folds of ``pl_dir``; its metrics.

    Each fold: the labeled-only head on the fold's labeled rows, then every candidate on the fold's
    pseudo-labels, scored on the fold's held-out labeled rows (labels from ``pl_dir``'s given labels).
    Without folds (validation off, or no class with two labels) the first candidate is used.
    """
    rcfg = cfg.retrain
    cands = recipes.candidates(rcfg)
    folds = sorted(Path(pl_dir, "val").glob("fold*"))
    if not folds:
        log.info("retrain: no validation folds; recipe %s (the first candidate)", cands[0].name)
        return cands[0], {"retrain/recipe_source": "first_candidate"}
    main = recipes.load_arrays(pl_dir)
    given = dict(zip(main["rows"].tolist(), np.where(main["labeled"], main["labels"], -1).tolist()))
    scores = {c.name: [0, 0.0] for c in cands}
    n_held = 0
    seed = int(cfg.seed)
    for fold in folds:
        held = np.load(fold / "heldout_rows.npy")
        y_held = np.array([given[int(r)] for r in held], np.int64)
        Xh = torch.from_numpy(embed(held))
        arrs = recipes.load_arrays(fold)
        lab = arrs["labeled"].astype(bool)
        lab_only = fit_head(embed(arrs["rows"][lab]), arrs["labels"][lab].astype(np.int64),
                            np.ones(int(lab.sum()), np.float32), n_classes, cfg, seed, None, "val", stats)
        for c in cands:
            d = recipes.training_data(arrs, c, rcfg, embed, _logits_of(lab_only), n_classes)
            head = lab_only if not d["is_pseudo"].any() else fit_head(
                d["X"], d["labels"], d["w"], n_classes, cfg, seed, None, "val", stats, d["targets"])
            with torch.no_grad():
                logp = torch.log_softmax(head(Xh), -1).numpy()
            scores[c.name][0] += int((logp.argmax(1) == y_held).sum())
            scores[c.name][1] += float(-logp[np.arange(len(held)), y_held].sum())
        n_held += len(held)
        log.info("retrain: recipe validation, %s: %d held-out rows, right so far %s", fold.name, n_held,
                 {k: v[0] for k, v in scores.items()})
    best = recipes.choose({k: tuple(v) for k, v in scores.items()}, [c.name for c in cands],
                          str(rcfg.get("choose_by", "logloss")))
    metrics = {f"val/retrain_accuracy/{k}": v[0] / n_held for k, v in scores.items()}
    metrics.update({f"val/retrain_logloss/{k}": v[1] / n_held for k, v in scores.items()})
    metrics.update({"val/retrain_accuracy": scores[best][0] / n_held, "val/retrain_n_heldout": n_held,
                    "val/retrain_folds": len(folds), "retrain/recipe_source": "validation"})
    log.info("retrain: recipe %s chosen on %d held-out labeled rows (%s)", best, n_held,
             ", ".join(f"{k} {v[0] / n_held:.3f}" for k, v in scores.items()))
    return next(c for c in cands if c.name == best), metrics
