"""Stage 4, retrain: a model on labeled + pseudo-labeled data vs the same model on labeled data only.

Both models are trained in the same run with the same seed, steps and optimizer, and evaluated
on the test split. Pseudo-labels are weighted by their confidence; those below
``retrain.min_confidence`` or flagged as noise (with ``retrain.drop_noisy``) are left out.

``retrain.mode``:

* ``head`` - a linear/MLP head on the cached embeddings (fast; the default). The labeled-only head
  is trained first; with ``retrain.pseudo_targets=soft`` (default) the pseudo-labeled head learns the
  labeler's label (as a distribution with its confidence on it) times the labeled-only head's posterior.
* ``finetune`` - the open_clip image tower plus a head trained on the images with Lightning
  (:class:`~ssl_pipeline.models.module.FinetuneModule`): frozen, last-N-blocks or full
  fine-tuning, weak augmentation, optional FixMatch consistency on unlabeled images, optional
  weight EMA, ``retrain.rounds`` rounds of retrain -> re-encode -> re-label. Lightning
  checkpoints go to ``<run_dir>/retrain/<phase>/checkpoints``; ``retrain.resume=true`` (or a
  run directory / ``.ckpt`` path) continues an interrupted run to the same final metrics.
  Runs on ``trainer.strategy=ddp trainer.devices=N`` (gloo on CPU).

Run directory (finetune)::

    retrain/key.txt                    the stage key the checkpoints belong to
    retrain/<phase>/checkpoints/       last.ckpt (every retrain.checkpoint_every steps)
    retrain/<phase>/model.pt, done.json  a finished phase (labeled_only, round1, round2, ...)
    retrain_logs/<phase>/version_*/    CSV (or TensorBoard) logs: train/loss, pseudo/weight_mean, val/acc

Artifact folder: head mode ``head.pt`` / ``head_labeled_only.pt``; finetune mode ``model.pt`` /
``model_labeled_only.pt`` (state dicts of tower + head), ``round<r>_pseudolabels.npz`` for the
re-labelled rounds; ``stage_metrics.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, atomic_save_npy, stable_hash, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.models.module import HeadModule
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)

# retrain keys that change how a run is executed or observed, not its result (left out of the cache key)
RUNTIME_KEYS = ("resume", "logger", "callbacks", "num_workers", "checkpoint_every", "val_every", "log_every",
                "eval_batch_size", "preload_max", "num_threads")


def select_training(rows, labels, conf, labeled, noise, rcfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, weights, is_pseudo) of the samples the semi-supervised model trains on."""
    conf = np.asarray(conf, np.float32)
    keep = labeled | ((labels >= 0) & (conf >= float(rcfg.min_confidence)))
    if rcfg.get("drop_noisy", True):
        keep &= labeled | ~noise
    if rcfg.get("pseudo_weight", "confidence") == "one":
        w = np.ones(len(rows), np.float32)
    else:
        w = np.where(labeled, 1.0, conf).astype(np.float32)
    return rows[keep], labels[keep], w[keep], ~labeled[keep]


def training_set(pl_dir: Path, rcfg: DictConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, labels, weights, is_pseudo) from a pseudolabel artifact."""
    return select_training(np.load(pl_dir / "rows.npy"), np.load(pl_dir / "labels.npy"),
                           np.load(pl_dir / "confidence.npy"), np.load(pl_dir / "labeled.npy"),
                           np.load(pl_dir / "noise.npy"), rcfg)


def filter_pseudo(labels: np.ndarray, conf: np.ndarray, labeled: np.ndarray, teacher_logits: np.ndarray | None,
                  how: str = "none", top: float = 1.0) -> np.ndarray:
    """Pseudo-labels kept for training (-1 = dropped) on the training rows; given labels are kept as they are.

    ``how="agree"``: keep those the teacher (the previous model) predicts too. ``top < 1``: then keep, per
    class, the ``top`` share ranked by labeler confidence times the teacher's probability of the label.
    """
    use = np.asarray(labels, np.int64).copy()
    unl = ~labeled & (use >= 0)
    score = np.asarray(conf, np.float64).copy()
    if teacher_logits is not None and len(teacher_logits):
        z = teacher_logits - teacher_logits.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        if how == "agree":
            use[unl & (p.argmax(1) != use)] = -1
        score = score * p[np.arange(len(use)), np.clip(use, 0, p.shape[1] - 1)]
    if not 0 < top <= 1:
        raise ConfigError("retrain.pseudo_top", f"must be in (0, 1], got {top}")
    if top < 1:
        for c in np.unique(use[~labeled & (use >= 0)]):
            idx = np.flatnonzero(~labeled & (use == c))
            keep = max(1, int(round(top * len(idx))))
            use[idx[np.argsort(-score[idx], kind="stable")[keep:]]] = -1
    return use


def soft_targets(labels: np.ndarray, conf: np.ndarray, labeled: np.ndarray, teacher_probs: np.ndarray) -> np.ndarray:
    """(n, C) training targets: one-hot on given labels; on pseudo-labeled rows the product of the labeler's
    label as a distribution (``conf`` on it, the rest spread evenly; uniform where dropped) and the teacher's
    posterior, renormalised."""
    n, C = teacher_probs.shape
    conf = np.clip(np.asarray(conf, np.float64), 1e-3, 1 - 1e-3)
    r = np.tile(((1 - conf) / max(1, C - 1))[:, None], (1, C))
    has = labels >= 0
    r[has, labels[has]] = conf[has]
    r[~has] = 1.0 / C
    q = r * np.asarray(teacher_probs, np.float64)
    q /= q.sum(1, keepdims=True).clip(1e-12)
    q[labeled] = 0
    q[labeled, labels[labeled]] = 1
    return q.astype(np.float32)


def key_config(cfg: DictConfig) -> dict:
    rc = OmegaConf.to_container(cfg.retrain, resolve=True)
    for k in RUNTIME_KEYS:
        rc.pop(k, None)
    conf = {"retrain": rc, "loss": OmegaConf.to_container(cfg.loss), "seed": int(cfg.seed)}
    if rc.get("mode", "head") == "finetune":
        conf["trainer"] = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else None
        conf["pseudolabel"] = OmegaConf.to_container(cfg.pseudolabel, resolve=True)  # re-labelling rounds
        conf["k"] = int(cfg.cluster.k)
    return conf


def make_logger(rcfg: DictConfig, log_dir: Path | None, name: str):
    """``retrain.logger``: csv (default), tensorboard, or none."""
    kind = str(rcfg.get("logger", "csv") or "none").lower()
    if log_dir is None or kind in ("none", "false", "null"):
        return False
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(str(log_dir), name=name)
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError as e:
            raise ConfigError("retrain.logger", "tensorboard is not installed (pip install tensorboard)") from e
        return L.pytorch.loggers.TensorBoardLogger(str(log_dir), name=name)
    raise ConfigError("retrain.logger", f"must be csv, tensorboard or none, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# head mode
# ---------------------------------------------------------------------------------------------


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


def _fit_head(X, y, w, n_classes, cfg, seed, log_dir, name, stats, targets) -> HeadModule:
    rcfg = cfg.retrain
    L.seed_everything(seed, workers=True, verbose=False)
    tensors = [torch.from_numpy(X), torch.from_numpy(y), torch.from_numpy(w)]
    if targets is not None:
        tensors.append(torch.from_numpy(np.asarray(targets, np.float32)))
    ds = torch.utils.data.TensorDataset(*tensors)
    bs = int(rcfg.batch_size)
    steps = int(rcfg.steps)
    # one long epoch of `steps` batches drawn with replacement: the same number of optimizer steps
    # whatever the training-set size (a labeled-only set of 40 gets as many updates as 4,000 pseudo-labels)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=steps * bs,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler)
    loss = instantiate(cfg.loss) if "_target_" in cfg.loss else None
    module = HeadModule(X.shape[1], n_classes, head=rcfg.head, hidden=int(rcfg.hidden), lr=float(rcfg.lr),
                        weight_decay=float(rcfg.weight_decay), dropout=float(rcfg.get("dropout", 0.0)), loss=loss,
                        max_steps=steps, **_standardiser(X, stats, rcfg))
    logger = make_logger(rcfg, log_dir, name)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        deterministic=True, log_every_n_steps=int(rcfg.get("log_every", 50)))
    trainer.fit(module, loader)
    return module.eval()


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


def test_positions(table: SampleTable, store: EmbeddingStore) -> np.ndarray:
    y_true = np.asarray(table.y_true)
    return np.flatnonzero(table.test[store.rows] & (y_true[store.rows] >= 0))


def _run_head(cfg, table, store, pl_dir, run_dir) -> tuple[dict, dict]:
    rcfg = cfg.retrain
    emb = store.load()
    pos_of = {int(r): i for i, r in enumerate(store.rows)}
    rows, labels, w, is_pseudo = training_set(pl_dir, rcfg)
    X = emb[[pos_of[int(r)] for r in rows]]
    n_classes = len(table.classes)
    y_true = np.asarray(table.y_true)
    test_pos = test_positions(table, store)
    seed = int(cfg.seed)
    log.info("retrain: head on %d samples (%d pseudo-labeled) vs %d labeled only", len(rows), int(is_pseudo.sum()),
             int((~is_pseudo).sum()))
    # both heads standardise with the statistics of every training-split embedding (no labels involved)
    stats = feature_stats(emb[np.flatnonzero(np.asarray(table.train)[store.rows])])
    lab_only = fit_head(X[~is_pseudo], labels[~is_pseudo], np.ones((~is_pseudo).sum(), np.float32), n_classes, cfg,
                        seed, run_dir / "retrain_logs", "labeled_only", stats)
    how = str(rcfg.get("pseudo_targets", "hard"))
    if how not in ("hard", "soft"):
        raise ConfigError("retrain.pseudo_targets", f"must be hard or soft, got {how!r}")
    targets = None
    if how == "soft" and is_pseudo.any():
        # the labeler's label as a distribution (its confidence on it) times the labeled-only head's posterior:
        # the two views' agreement (a graph over all images, a classifier on the given labels) sets the target
        with torch.no_grad():
            teacher = torch.softmax(lab_only(torch.from_numpy(X)) / float(rcfg.get("teacher_temperature", 1.0)),
                                    -1).numpy()
        conf = np.load(pl_dir / "confidence.npy").astype(np.float32)
        conf_of = dict(zip(np.load(pl_dir / "rows.npy").tolist(), conf.tolist()))
        targets = soft_targets(labels, np.array([conf_of[int(r)] for r in rows], np.float32), ~is_pseudo, teacher)
    semi = fit_head(X, labels, w, n_classes, cfg, seed, run_dir / "retrain_logs", "semi_supervised", stats, targets)
    metrics = {"retrain/n_train": len(rows), "retrain/n_pseudo": int(is_pseudo.sum()),
               "retrain/pseudo_weight_mean": float(w[is_pseudo].mean()) if is_pseudo.any() else 0.0}
    y_rows = y_true[rows]
    if is_pseudo.any() and (y_rows[is_pseudo] >= 0).any():
        k = is_pseudo & (y_rows >= 0)
        metrics["retrain/used_pseudolabel_accuracy"] = float((labels[k] == y_rows[k]).mean())
        if targets is not None:
            metrics["retrain/soft_target_mass_on_truth"] = float(targets[k, y_rows[k]].mean())
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


# ---------------------------------------------------------------------------------------------
# finetune mode
# ---------------------------------------------------------------------------------------------


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class ResumePlan:
    """Where an interrupted finetune run is continued from (decided before any process is started).

    ``retrain.resume``: false (start over: this run directory's old phases are removed), true
    (this run directory), a run directory, a ``retrain/`` folder, or a ``.ckpt`` file
    (``<run>/retrain/<phase>/checkpoints/x.ckpt``: that phase continues from that checkpoint).
    """

    def __init__(self, resume, root: Path, key: str):
        self.root, self.key, self.src, self.explicit = root, key, None, {}
        flag = str(resume).strip().lower() if resume is not None else "false"
        if flag in ("false", "none", "null", "", "0", "no"):
            if root.exists() and _rank() == 0:
                for d in root.iterdir():
                    if d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
        elif flag in ("true", "1", "yes"):
            self.src = root
        else:
            p = Path(str(resume)).expanduser().resolve()
            if p.is_file():
                self.explicit = {p.parent.parent.name: p}
                self.src = p.parent.parent.parent
            elif (p / "retrain").is_dir():
                self.src = p / "retrain"
            elif p.is_dir():
                self.src = p
            else:
                raise ConfigError("retrain.resume", f"{str(p)!r} is neither a run directory nor a checkpoint file")
        if self.src is not None and (self.src / "key.txt").exists():
            old = (self.src / "key.txt").read_text().strip()
            if old != key:
                raise ConfigError("retrain.resume", f"the checkpoints in {self.src} belong to another retrain "
                                                    f"configuration (key {old}, this run {key}); resume with the "
                                                    f"same overrides, or set retrain.resume=false to start over")
        root.mkdir(parents=True, exist_ok=True)
        if _rank() == 0:
            (root / "key.txt").write_text(key + "\n")

    def finished(self, phase: str) -> Path | None:
        if self.src is None:
            return None
        d = self.src / phase
        return d if (d / "done.json").exists() and (d / "model.pt").exists() else None

    def checkpoint(self, phase: str) -> Path | None:
        if phase in self.explicit:
            return self.explicit[phase]
        if self.src is None:
            return None
        c = self.src / phase / "checkpoints" / "last.ckpt"
        return c if c.exists() else None


class Finetuner:
    """One finetune retrain: the view bank, the phases (labeled_only, round1..N) and their evaluation."""

    def __init__(self, cfg: DictConfig, table: SampleTable, store: EmbeddingStore, cache: ArtifactCache,
                 key: str, run_dir: Path):
        from ssl_pipeline.backbones import load_backbone
        from ssl_pipeline.models.finetune import RowImages, make_transforms

        self.cfg, self.rcfg, self.table, self.store, self.cache, self.key = cfg, cfg.retrain, table, store, cache, key
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "retrain"
        self.seed = int(cfg.seed)
        self.tcfg = OmegaConf.to_container(cfg.trainer, resolve=True) if "trainer" in cfg else None
        rc = self.rcfg
        self.tower_cfg = rc.get("tower", {}) or {}
        self.backbone = load_backbone(cfg.backbone, device="cpu")
        self.backbone.model.to(memory_format=torch.channels_last)
        self.pristine = copy.deepcopy(self.backbone.model.visual).cpu()
        self.n_classes = len(table.classes)
        aug = rc.get("augment", {}) or {}
        self.transforms = make_transforms(self.backbone.preprocess, self.backbone.image_size,
                                          int(aug.get("strong_ops", 2)), int(aug.get("strong_magnitude", 10)))
        self.images = RowImages(table, self.backbone.image_size, int(rc.get("preload_max", 10000)))
        cons = rc.get("consistency", {}) or {}
        self.consistency = bool(cons.get("enabled", False))
        self.loss = instantiate(cfg.loss) if "_target_" in cfg.loss else None
        self.extra_callbacks = [instantiate(c) for c in (rc.get("callbacks") or [])]
        self.plan = ResumePlan(rc.get("resume", False), self.root, key)
        probe = self.new_net()
        self.cached = probe.can_cache and int(self.tower_cfg.get("cache_views", 0)) > 0
        self.frozen_blocks = probe.frozen_blocks
        self.trainable_params = probe.trainable_parameters()
        self.total_params = sum(p.numel() for p in probe.parameters())
        self.bank = None

    # -- building blocks ---------------------------------------------------------------------
    def new_net(self, init_from=None):
        from ssl_pipeline.models.finetune import FinetuneNet, mix_seed

        rc, t = self.rcfg, self.tower_cfg
        torch.manual_seed(mix_seed(self.seed, 17))
        net = FinetuneNet(copy.deepcopy(self.pristine), self.n_classes, self.backbone.embed_dim,
                          head=rc.get("head", "linear"), hidden=int(rc.get("hidden", 512)),
                          dropout=float(rc.get("dropout", 0.0)), train_mode=str(t.get("train", "partial")),
                          unfreeze_last=int(t.get("unfreeze_last", 2)))
        if init_from is not None:
            net.load_state_dict(init_from.state_dict())
        return net

    def opt(self) -> dict:
        rc, t = self.rcfg, self.tower_cfg
        cons = rc.get("consistency", {}) or {}
        return {"steps": int(rc.steps), "batch_size": int(rc.batch_size),
                "labeled_fraction": float(rc.get("labeled_fraction", 0.25)),
                "unlabeled_batch": int(cons.get("unlabeled_batch", 64)),
                "consistency_weight": float(cons.get("weight", 1.0)) if self.consistency else 0.0,
                "threshold": float(cons.get("threshold", 0.95)),
                "lr": float(rc.lr), "backbone_lr": float(rc.get("backbone_lr", rc.lr)),
                "weight_decay": float(rc.weight_decay), "layer_decay": float(t.get("layer_decay", 1.0)),
                "warmup": float(rc.get("warmup", 0.05)), "ema": float(rc.get("ema", 0.0) or 0.0),
                "num_workers": int(rc.get("num_workers", 0))}

    def build_bank(self, train_rows: np.ndarray, test_rows: np.ndarray) -> None:
        """The frozen-prefix outputs of the clean view of every row and V weak (+ V strong) views of train rows."""
        from ssl_pipeline.models.finetune import BankItems, ViewBank
        from ssl_pipeline.stages.predict_writer import predict_arrays

        V = int(self.tower_cfg.get("cache_views", 8))
        S = V if self.consistency else 0
        aug = OmegaConf.to_container(self.rcfg.get("augment", {}) or {}, resolve=True)
        bkey = self.cache.key("retrain_bank", {
            "encode": self.store.path.name, "backbone": OmegaConf.to_container(self.cfg.backbone, resolve=True),
            "train": str(self.tower_cfg.get("train", "partial")), "frozen_blocks": self.frozen_blocks,
            "views": V, "strong": S, "aug": aug, "seed": self.seed, "train_rows": stable_hash(train_rows.tolist()),
            "test_rows": stable_hash(test_rows.tolist())})
        path = self.cache.path("retrain_bank", bkey)
        t0 = time.perf_counter()
        if self.cache.is_complete("retrain_bank", bkey):
            log.info("retrain: reusing view bank %s", path)
            rows = np.load(path / "rows.npy")
            clean = torch.from_numpy(np.load(path / "clean.npy"))
            weak = torch.from_numpy(np.load(path / "weak.npy"))
            strong = torch.from_numpy(np.load(path / "strong.npy")) if S else None
            self.bank = ViewBank(rows, clean, weak, strong)
            self.bank_seconds = 0.0
            return
        net = self.new_net().eval()
        log.info("retrain: view bank, %d train rows x (1 + %d + %d views) and %d test rows through the frozen "
                 "prefix (%d of %d blocks)", len(train_rows), V, S, len(test_rows), self.frozen_blocks,
                 net.parts.n_blocks if net.parts else 0)

        def prefix(net, batch):
            idx, x = batch
            B, K = x.shape[:2]
            h = net.prefix(x.flatten(0, 1).to(memory_format=torch.channels_last)).half()
            return {"idx": idx, "out": h.reshape(B, K, *h.shape[1:])}

        bs = max(1, int(self.rcfg.get("eval_batch_size", 256)) // (1 + V + S))
        tr = predict_arrays(net, BankItems(self.images, train_rows, np.full(len(train_rows), V),
                                           np.full(len(train_rows), S), self.transforms, self.seed),
                            prefix, self.root / "tmp_bank_train", self.tcfg, batch_size=bs)["out"]
        te = predict_arrays(net, BankItems(self.images, test_rows, np.zeros(len(test_rows), int),
                                           np.zeros(len(test_rows), int), self.transforms, self.seed),
                            prefix, self.root / "tmp_bank_test", self.tcfg,
                            batch_size=int(self.rcfg.get("eval_batch_size", 256)))["out"] \
            if len(test_rows) else torch.zeros((0, 1) + tuple(tr.shape[2:]), dtype=torch.float16)
        rows = np.concatenate([train_rows, test_rows]).astype(np.int64)
        clean = torch.cat([tr[:, 0], te[:, 0]])
        weak, strong = tr[:, 1:1 + V].contiguous(), tr[:, 1 + V:].contiguous() if S else None
        self.bank = ViewBank(rows, clean, weak, strong)
        self.bank_seconds = time.perf_counter() - t0
        if _rank() == 0:
            with self.cache.writing("retrain_bank", bkey) as tmp:
                atomic_save_npy(tmp / "rows.npy", rows)
                atomic_save_npy(tmp / "clean.npy", clean.numpy())
                atomic_save_npy(tmp / "weak.npy", weak.numpy())
                if S:
                    atomic_save_npy(tmp / "strong.npy", strong.numpy())

    def clean_items(self, rows: np.ndarray):
        """Dataset of ``(index, input)`` for the clean view of ``rows`` (bank tensors or images)."""
        bank, images, tf = self.bank, self.images, self.transforms["clean"]

        class Items(torch.utils.data.Dataset):
            def __len__(self):
                return len(rows)

            def __getitem__(self, i):
                r = int(rows[i])
                return i, (bank.clean[bank.pos[r]] if bank is not None else tf(images.get(r)))
        return Items()

    def predict(self, net, rows: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (n, D) float32 L2-normalised, logits (n, C)) of ``rows`` through ``net``."""
        from ssl_pipeline.stages.predict_writer import predict_arrays

        if len(rows) == 0:
            return np.zeros((0, self.backbone.embed_dim), np.float32), np.zeros((0, self.n_classes), np.float32)
        cached = self.bank is not None

        def fn(net, batch):
            idx, x = batch
            if not cached:
                x = x.to(memory_format=torch.channels_last)
            e = net.embed(x, cached=cached)
            return {"idx": idx, "emb": e.float(), "logits": net.head(e).float()}

        out = predict_arrays(net.eval(), self.clean_items(rows), fn, self.root / f"tmp_{name}", self.tcfg,
                             batch_size=int(self.rcfg.get("eval_batch_size", 256)))
        return out["emb"].numpy(), out["logits"].numpy()

    def view_probs(self, net, rows: np.ndarray, temperature: float = 1.0) -> np.ndarray:
        """(n, C) class probabilities of ``rows`` averaged over the clean view and the bank's weak views."""
        from ssl_pipeline.stages.predict_writer import predict_arrays

        _, lg = self.predict(net, rows, "eval")
        P = torch.softmax(torch.from_numpy(lg) / temperature, -1)
        bank = self.bank
        if bank is None or bank.weak is None or len(rows) == 0:
            return P.numpy()
        V = bank.n_views
        pos = np.array([bank.pos[int(r)] for r in rows])

        class Views(torch.utils.data.Dataset):
            def __len__(self):
                return len(pos) * V

            def __getitem__(self, i):
                return i, bank.weak[pos[i // V], i % V]

        def fn(net, batch):
            idx, x = batch
            return {"idx": idx, "logits": net(x, cached=True).float()}

        lgv = predict_arrays(net.eval(), Views(), fn, self.root / "tmp_views", self.tcfg,
                             batch_size=int(self.rcfg.get("eval_batch_size", 256)))["logits"]
        Pv = torch.softmax(lgv.reshape(len(rows), V, -1) / temperature, -1)
        return ((P + Pv.sum(1)) / (V + 1)).numpy()

    def init_head(self, net, ts) -> None:
        from ssl_pipeline.models.finetune import init_head_from_prototypes

        if self.rcfg.get("head_init", "prototypes") != "prototypes":
            return
        lab = ~ts.is_pseudo
        if not lab.any():
            return
        emb, _ = self.predict(net, ts.rows[lab], "init")
        init_head_from_prototypes(net, torch.from_numpy(emb), torch.from_numpy(ts.labels[lab]))

    # -- one phase -------------------------------------------------------------------------------
    def fit(self, phase: str, ts, init_from=None):
        """Train (or resume, or load a finished) phase; return the trained net (EMA weights if on)."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        from ssl_pipeline.models.finetune import TrainItems
        from ssl_pipeline.models.module import FinetuneModule

        net = self.new_net(init_from)
        done = self.plan.finished(phase)
        pdir = self.root / phase
        self._logger = None
        if done is not None:
            log.info("retrain: %s already finished in %s; loading it", phase, done)
            net.load_state_dict(torch.load(done / "model.pt", map_location="cpu", weights_only=True))
            if done != pdir and _rank() == 0:
                pdir.mkdir(parents=True, exist_ok=True)
                for f in ("model.pt", "done.json"):
                    shutil.copy(done / f, pdir / f)
            return net
        if init_from is None:
            self.init_head(net, ts)
        ckpt = self.plan.checkpoint(phase)
        items = TrainItems(ts, self.bank, None if self.bank is not None else self.images, self.transforms)
        val_every = int(self.rcfg.get("val_every", 0) or 0)
        val_loader = None
        if val_every > 0 and len(self.test_rows):
            test_y = torch.from_numpy(self.test_y)

            def collate(b):
                return torch.stack([x for _, x in b]), test_y[[i for i, _ in b]]
            val_loader = torch.utils.data.DataLoader(self.clean_items(self.test_rows), collate_fn=collate,
                                                     batch_size=int(self.rcfg.get("eval_batch_size", 256)))
        module = FinetuneModule(net, items, ts, self.opt(), loss=self.loss, seed=self.seed, phase=phase,
                                cached=self.bank is not None, val_loader=val_loader)
        steps = int(self.rcfg.steps)
        every = max(1, int(self.rcfg.get("checkpoint_every", 50) or steps))
        ckpt_cb = ModelCheckpoint(dirpath=str(pdir / "checkpoints"), save_last=True, save_top_k=0,
                                  every_n_train_steps=every, save_on_train_epoch_end=False)
        logger = make_logger(self.rcfg, self.run_dir / "retrain_logs", phase)
        from ssl_pipeline.stages.predict_writer import make_trainer

        trainer = make_trainer(self.tcfg, max_steps=steps, max_epochs=-1, logger=logger,
                               callbacks=[ckpt_cb, *self.extra_callbacks], enable_checkpointing=True,
                               log_every_n_steps=int(self.rcfg.get("log_every", 10)),
                               val_check_interval=val_every if val_loader is not None else None,
                               check_val_every_n_epoch=None if val_loader is not None else 1,
                               limit_val_batches=1.0 if val_loader is not None else 0, num_sanity_val_steps=0)
        if ckpt is not None:
            log.info("retrain: %s resumes from %s", phase, ckpt)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")  # the frozen tower, on purpose
            trainer.fit(module, ckpt_path=str(ckpt) if ckpt is not None else None)
        self.fit_seconds[phase] = round(time.perf_counter() - t0, 2)
        self.world_size = trainer.world_size
        module.apply_ema()
        self._logger = logger
        net = module.net.cpu()
        if _rank() == 0:
            pdir.mkdir(parents=True, exist_ok=True)
            torch.save(net.state_dict(), pdir / "model.pt")
            write_json(pdir / "done.json", {"key": self.key, "steps": steps, "seconds": self.fit_seconds[phase]})
        return net

    def log_final(self, phase: str, acc: float) -> None:
        lg = getattr(self, "_logger", None)
        if lg and _rank() == 0:
            lg.log_metrics({"val/acc": acc}, step=int(self.rcfg.steps))
            lg.save()

    def relabel(self, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labels, confidence, noise) of a fresh ``cfg.pseudolabel.labeler`` fitted on ``X`` with labels ``y``."""
        from ssl_pipeline.labeling.knn import knn_graph

        labeler = instantiate(self.cfg.pseudolabel.labeler)
        labeler.fit(X, y, neighbors=knn_graph(X, int(self.cfg.cluster.k)))
        return (np.asarray(labeler.labels_, np.int64), np.asarray(labeler.confidence_, np.float32),
                np.asarray(getattr(labeler, "noise_", np.zeros(len(X), bool)), bool))

    # -- the whole stage ---------------------------------------------------------------------
    def run(self, pl_dir: Path) -> tuple[dict, dict]:
        from ssl_pipeline.models.finetune import TrainSet

        rc = self.rcfg
        t0 = time.perf_counter()
        self.fit_seconds: dict[str, float] = {}
        self.world_size = 1
        graph_rows = np.load(pl_dir / "rows.npy")
        labeled = np.load(pl_dir / "labeled.npy")
        y_true = np.asarray(self.table.y_true)
        test_pos = test_positions(self.table, self.store)
        self.test_rows = self.store.rows[test_pos].astype(np.int64)
        self.test_y = y_true[self.test_rows]
        g_labels = np.load(pl_dir / "labels.npy")
        g_conf = np.load(pl_dir / "confidence.npy").astype(np.float32)
        g_noise = np.load(pl_dir / "noise.npy")
        g_true = y_true[graph_rows]
        unl_rows = graph_rows[~labeled] if self.consistency else np.zeros(0, np.int64)
        rows, labels, w, is_pseudo = select_training(graph_rows, g_labels, g_conf, labeled, g_noise, rc)
        metrics = {"retrain/mode": "finetune", "retrain/n_train": len(rows), "retrain/n_pseudo": int(is_pseudo.sum()),
                   "retrain/pseudo_weight_mean": float(w[is_pseudo].mean()) if is_pseudo.any() else 0.0,
                   "retrain/trainable_params": self.trainable_params, "retrain/total_params": self.total_params,
                   "retrain/steps": int(rc.steps)}
        if self.cached:
            self.build_bank(graph_rows.astype(np.int64), self.test_rows)
            metrics["retrain/bank_seconds"] = round(self.bank_seconds, 2)
            metrics["retrain/cache_views"] = self.bank.n_views

        def acc(logits):
            return float((logits.argmax(1) == self.test_y).mean()) if len(self.test_y) else float("nan")

        lab = ~is_pseudo
        lab_ts = TrainSet(rows[lab], labels[lab], np.ones(int(lab.sum()), np.float32), np.zeros(int(lab.sum()), bool),
                          np.zeros(0, np.int64))
        lab_net = self.fit("labeled_only", lab_ts)
        filt = str(rc.get("pseudo_filter", "none"))
        if filt not in ("none", "agree"):
            raise ConfigError("retrain.pseudo_filter", f"must be none or agree, got {filt!r}")
        needs_teacher = filt != "none" or float(rc.get("pseudo_top", 1.0)) < 1 or rc.get("pseudo_targets") == "soft"
        eval_rows = np.concatenate([graph_rows, self.test_rows]) if needs_teacher else self.test_rows
        _, lg = self.predict(lab_net, eval_rows, "eval")
        teacher = lg[:len(graph_rows)] if needs_teacher else None  # labeled-only logits on the training rows
        lab_acc = acc(lg[len(eval_rows) - len(self.test_rows):])
        self.log_final("labeled_only", lab_acc)
        states = {"model_labeled_only.pt": lab_net.state_dict()}
        extra_arrays = {}
        n_rounds = int(rc.get("rounds", 1))
        if n_rounds < 1:
            raise ConfigError("retrain.rounds", f"must be >= 1, got {n_rounds}")
        prev, Xg = None, None
        y_graph = np.where(labeled, g_true, -1)
        known = ~labeled & (g_true >= 0)
        soft = str(rc.get("pseudo_targets", "hard")) == "soft"
        if str(rc.get("pseudo_targets", "hard")) not in ("hard", "soft"):
            raise ConfigError("retrain.pseudo_targets", f"must be hard or soft, got {rc.pseudo_targets!r}")
        teacher_net, teacher_probs = lab_net, None
        relabel_first = bool(rc.get("relabel_first", False))
        if relabel_first:  # round 1 re-labels too: on the training rows encoded by the labeled-only model
            Xg, _ = self.predict(lab_net, graph_rows, "encode")
        for r in range(1, n_rounds + 1):
            if r > 1 or relabel_first:  # re-label with a fresh labeler on the re-encoded rows, same given labels
                g_labels, g_conf, g_noise = self.relabel(Xg, y_graph)
                if known.any():
                    metrics[f"retrain/round{r}/pseudolabel_accuracy"] = float((g_labels[known] == g_true[known]).mean())
                extra_arrays[f"round{r}_pseudolabels.npz"] = dict(rows=graph_rows, labels=g_labels, confidence=g_conf,
                                                                   noise=g_noise)
            use = filter_pseudo(g_labels, g_conf, labeled, teacher, filt, float(rc.get("pseudo_top", 1.0)))
            rows, labels, w, is_pseudo = select_training(graph_rows, use, g_conf, labeled, g_noise, rc)
            targets = None
            if soft:  # the labeler's label, as a distribution, times the previous model's view-averaged posterior
                if teacher_probs is None:
                    teacher_probs = self.view_probs(teacher_net, graph_rows, float(rc.get("teacher_temperature", 1.0)))
                gpos = {int(x): i for i, x in enumerate(graph_rows)}
                targets = soft_targets(use, g_conf, labeled, teacher_probs)[[gpos[int(x)] for x in rows]]
            metrics[f"retrain/round{r}/n_pseudo"] = int(is_pseudo.sum())
            kept = known & np.isin(graph_rows, rows)
            if kept.any():
                metrics[f"retrain/round{r}/used_pseudolabel_accuracy"] = float((use[kept] == g_true[kept]).mean())
            ts = TrainSet(rows, labels, w, is_pseudo, unl_rows, targets)
            init = prev if (r > 1 and rc.get("round_init", "pretrained") == "previous") else None
            net = self.fit(f"round{r}", ts, init_from=init)
            last = r == n_rounds
            eval_rows = self.test_rows if last else np.concatenate([graph_rows, self.test_rows])
            emb, lg = self.predict(net, eval_rows, "eval")
            metrics[f"retrain/round{r}/test_accuracy"] = acc(lg[len(eval_rows) - len(self.test_rows):])
            self.log_final(f"round{r}", metrics[f"retrain/round{r}/test_accuracy"])
            if not last:
                Xg, teacher = emb[:len(graph_rows)], lg[:len(graph_rows)]
                teacher_net, teacher_probs = net, None
            prev = net
        final = metrics[f"retrain/round{n_rounds}/test_accuracy"]
        if len(self.test_rows):
            metrics["retrain/test_accuracy"] = final
            metrics["retrain/labeled_only_test_accuracy"] = lab_acc
            metrics["retrain/n_test"] = len(self.test_rows)
        else:
            for k in [k for k in metrics if k.endswith("/test_accuracy")]:
                del metrics[k]
        metrics["retrain/world_size"] = int(self.world_size)
        metrics["retrain/train_seconds"] = round(sum(self.fit_seconds.values()), 2)
        states["model.pt"] = prev.state_dict()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has read its last predictions
        if _rank() == 0:
            for d in self.root.glob("tmp_*"):
                shutil.rmtree(d, ignore_errors=True)
        log.info("retrain: finetune done in %.0fs: test acc %.4f vs labeled-only %.4f", time.perf_counter() - t0,
                 final, lab_acc)
        return metrics, {"states": states, "arrays": extra_arrays}


def run(cfg: DictConfig, table: SampleTable, store: EmbeddingStore, pl_dir: Path, cache: ArtifactCache,
        upstream: str, run_dir: Path, force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the retrain stage; return (artifact dir, metrics, key)."""
    rcfg = cfg.retrain
    if int(rcfg.steps) < 1:
        raise ConfigError("retrain.steps", f"must be >= 1, got {rcfg.steps}")
    mode = rcfg.get("mode", "head")
    if mode not in ("head", "finetune"):
        raise ConfigError("retrain.mode", f"must be head or finetune, got {mode!r}")
    key = cache.key("retrain", key_config(cfg), upstream)
    final = cache.path("retrain", key)
    if cache.is_complete("retrain", key) and not force:
        log.info("retrain: reusing %s", final)
        metrics = json.loads((final / "stage_metrics.json").read_text())
        _export_model(cfg, table, final, run_dir, metrics)
        return final, metrics, key
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if mode == "head":
        metrics, states = _run_head(cfg, table, store, pl_dir, run_dir)
        arrays = {}
    else:
        from ssl_pipeline.stages.predict_writer import DDPSection

        with DDPSection():  # DDP workers re-launched for this stage exit at its end
            metrics, out = Finetuner(cfg, table, store, cache, key, run_dir).run(pl_dir)
        states, arrays = out["states"], out["arrays"]
    if "retrain/test_accuracy" in metrics:
        metrics["retrain/gain"] = metrics["retrain/test_accuracy"] - metrics["retrain/labeled_only_test_accuracy"]
    else:
        log.warning("retrain: no test split with labels; test accuracy is not reported "
                    "(set data.test_root / data.test_fraction, or a split column in the embeddings file)")
    metrics["retrain/seconds"] = round(time.perf_counter() - t0, 2)
    with cache.writing("retrain", key) as tmp:
        for name, sd in states.items():
            torch.save(sd, tmp / name)
        for name, arrs in arrays.items():
            np.savez(tmp / name, **arrs)
        write_json(tmp / "stage_metrics.json", metrics)
    _export_model(cfg, table, final, run_dir, metrics)
    return final, metrics, key


def _export_model(cfg, table, stage_dir: Path, run_dir: Path, metrics: dict) -> None:
    """Hook (model export): ``<run_dir>/model/`` from the retrain artifact, see :mod:`ssl_pipeline.model.export`."""
    from ssl_pipeline.model.export import export_retrain

    export_retrain(cfg, table, stage_dir, Path(run_dir), metrics)
