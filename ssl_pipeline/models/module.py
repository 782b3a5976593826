"""LightningModules: a head on cached embeddings (and, in retrain.mode=finetune, a tower on images)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from ssl_pipeline.models.heads import make_head


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int, pct_start: float = 0.1):
    """OneCycle schedule over ``steps`` (10% warm-up); at least two warm-up steps, so that short runs (a few
    steps, e.g. in tests) do not divide by a zero-length phase; under 4 steps a constant rate."""
    steps = int(steps)
    if steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                               pct_start=min(0.5, max(pct_start, 2.0 / steps)))


def loss_kind(loss) -> str:
    """How a ``loss=`` module is used by the retrain heads: ``ce`` (logits, labels, weights), ``asl`` (logits vs
    one-hot or soft targets, per-sample weights) or ``contrastive`` (SamToNe: images vs the class table)."""
    from ssl_pipeline.models.losses import AsymmetricLoss, SamToNeLoss

    if isinstance(loss, AsymmetricLoss):
        return "asl"
    if isinstance(loss, SamToNeLoss):
        return "contrastive"
    return "ce"


def supervised_loss(loss_fn, kind: str, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The ``w``-weighted loss of ``logits`` (B, C) against labels ``y`` (B,) or soft targets ``y`` (B, C)."""
    if kind == "asl":
        t = y.float() if y.ndim == 2 else nn.functional.one_hot(y, logits.shape[1]).float()
        return loss_fn(logits.float(), t, weight=w)
    if y.ndim == 2:
        ce = -(y * torch.log_softmax(logits.float(), dim=-1)).sum(-1)
        return (ce * w).sum() / w.sum().clamp_min(1e-12)
    return loss_fn(logits, y, w)


def ddp_weighted(module: L.LightningModule, loss: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rescale a rank's weighted-mean ``loss`` so that DDP's gradient average is the global batch's weighted mean."""
    world = module.trainer.world_size if module._trainer is not None else 1
    if world > 1:
        local = w.sum().detach()
        total = module.trainer.strategy.reduce(local.clone(), reduce_op="sum")
        loss = loss * (world * local / total.clamp_min(1e-12))
    return loss


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (B, C) x (B,) with per-sample weights (B,), normalised by the weight sum."""
    loss = nn.functional.cross_entropy(logits, target, reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


class HeadModule(L.LightningModule):
    """A classification head trained on (embedding, label, weight) triples.

    Batches are ``(x (B, D) float, y (B,) int, w (B,) float)``, optionally with soft targets
    ``q (B, C)`` (then the loss is the ``w``-weighted cross-entropy against ``q``; ``y`` is its
    argmax, for reference); pseudo-labels carry their confidence as weight, given labels weight 1.

    Parameters
    ----------
    in_dim, n_classes : int
    head : str
        ``linear`` or ``mlp``.
    loss : callable(logits, target, weight) -> scalar, default confidence-weighted CE
    feature_mean, feature_std : (in_dim,) tensors or None
        Per-dimension standardisation applied before the head (stored in the state dict).
        L2-normalised embeddings have per-dimension scales of about ``in_dim ** -0.5``; without
        it a head trained for a fixed number of Adam steps underfits (measured on the demo: 0.63
        -> 0.73 test accuracy with pseudo-labels).
    """

    def __init__(self, in_dim: int, n_classes: int, head: str = "linear", hidden: int = 512, lr: float = 1e-3,
                 weight_decay: float = 1e-4, dropout: float = 0.0, loss=None, max_steps: int = 1000,
                 feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["loss", "feature_mean", "feature_std"])
        self.register_buffer("feature_mean", torch.zeros(in_dim) if feature_mean is None
                             else torch.as_tensor(feature_mean, dtype=torch.float32))
        self.register_buffer("feature_std", torch.ones(in_dim) if feature_std is None
                             else torch.as_tensor(feature_std, dtype=torch.float32))
        self.head = make_head(head, in_dim, n_classes, hidden, dropout)
        self.loss_fn = loss or weighted_ce
        self.kind = loss_kind(self.loss_fn)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, F) L2-normalised inputs of the head's last layer (the contrastive image tower)."""
        return nn.functional.normalize(self.head[:-1]((x - self.feature_mean) / self.feature_std), dim=-1)

    def class_table(self) -> torch.Tensor:
        """(C, F) L2-normalised class embeddings: the rows of the head's last layer."""
        return nn.functional.normalize(self.head[-1].weight, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) embeddings -> (B, n_classes) logits (contrastive: cosine to the class table / tau)."""
        if self.kind == "contrastive":
            return self.features(x) @ self.class_table().T * self.loss_fn.scale.to(x.device)
        return self.head((x - self.feature_mean) / self.feature_std)

    def training_step(self, batch, batch_idx):
        """``batch``: (x (B, D), y (B,), w (B,)[, q (B, C)][, w_total ()]); ``w_total``, the weight sum of the
        global batch under DDP, turns this rank's weighted mean into its share of the global one."""
        x, y, w = batch[:3]
        q = batch[3] if len(batch) > 3 and batch[3].ndim == 2 else None
        w_total = batch[-1] if batch[-1].ndim == 0 else None
        if self.kind == "contrastive":  # images vs their class rows; same-class pairs are not negatives
            if q is not None:  # soft targets: each pair weighted by the target's mass on its label
                w = w * q.gather(1, y[:, None]).squeeze(1)
            loss = self.loss_fn(self.features(x), self.class_table()[y], pos_mask=y[:, None] == y[None, :], weight=w)
        else:
            loss = supervised_loss(self.loss_fn, self.kind, self(x), q if q is not None else y, w)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and w_total is not None:  # DDP averages the ranks' gradients
            loss = loss * (world * w.sum().detach() / w_total.clamp_min(1e-12))
        self.log("train/loss", loss.detach(), prog_bar=False, on_step=True, on_epoch=False)
        self.log("pseudo/weight_mean", w.mean(), on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = one_cycle(opt, self.hparams.lr, self.hparams.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class FinetuneModule(L.LightningModule):
    """Image tower + head trained on labeled and confidence-weighted pseudo-labeled images.

    Batches come from :class:`~ssl_pipeline.models.finetune.StepBatchSampler`:
    ``(x, y, w, code)`` with ``code`` 0 = given label, 1 = pseudo-label (weight = its
    confidence), 10/20 = weak/strong view of an unlabeled image (consistency term only).
    ``x`` holds images, or frozen-prefix outputs from the view bank when ``cached``.

    The loss is the weighted CE of the supervised samples, normalised by the weight sum over
    all ranks (so DDP matches one process on the global batch), plus, with consistency on,
    FixMatch: ``consistency_weight * mean(1[p_weak >= threshold] * CE(strong, argmax p_weak))``.

    Every step reseeds torch's RNG from (seed, step, rank), and the optional weight EMA lives
    in the checkpoint: a run resumed from a checkpoint replays the remaining steps exactly.

    ``opt`` keys: steps, batch_size, labeled_fraction, unlabeled_batch, lr, backbone_lr,
    weight_decay, layer_decay, warmup, ema, consistency_weight, threshold, num_workers, simcse_weight,
    simcse_dropout.

    ``loss`` SamToNe (``loss=samtone``): the supervised images' embeddings against their rows of the class
    table (the cosine head's weights), same-class pairs out of the negatives, weighted per sample.
    ``unsup`` (``loss=simcse_pp``): a :class:`~ssl_pipeline.models.contrastive.SimCSEPPLoss` on the unlabeled
    images: ``z1, z2`` = the weak and the strong view's embedding, each through dropout ``simcse_dropout``;
    negatives from the dropout-off pass of the weak views (the tower's own dropout off too); the term is
    added with weight ``simcse_weight``.
    """

    def __init__(self, net, train_items, train_set, opt: dict, loss=None, seed: int = 0, phase: str = "",
                 cached: bool = False, val_loader=None, unsup=None):
        super().__init__()
        self.net = net
        self.train_items, self.train_set = train_items, train_set
        self.opt = dict(opt)
        self.loss_fn = loss or weighted_ce
        self.kind = loss_kind(self.loss_fn)
        self.unsup = unsup
        self.seed, self.phase, self.cached = int(seed), phase, cached
        self._val_loader = val_loader
        self._ema: dict[str, torch.Tensor] | None = None
        if float(self.opt.get("ema", 0.0)) > 0:
            self._ema = {k: v.detach().clone() for k, v in self._ema_source().items()}

    # -- data ------------------------------------------------------------------------------
    def train_dataloader(self):
        from ssl_pipeline.models.views import StepBatchSampler, StepLoader, collate_train

        world, rank = self.trainer.world_size, self.trainer.global_rank
        bs = int(self.opt["batch_size"])
        if bs % world:
            from ssl_pipeline.errors import ConfigError

            raise ConfigError("retrain.batch_size", f"must be a multiple of the {world} processes, got {bs}")
        b = bs // world
        n_lab = min(b, max(1, round(b * float(self.opt.get("labeled_fraction", 0.25)))))
        uses_unl = self.opt.get("consistency_weight", 0) or (self.unsup is not None and self.opt.get("simcse_weight"))
        n_unl = int(self.opt.get("unlabeled_batch", 0)) // world if uses_unl else 0
        sampler = StepBatchSampler(self.train_set, int(self.opt["steps"]), n_lab, b - n_lab, n_unl, self.seed,
                                   start=self.trainer.global_step, rank=rank, world=world)
        nw = int(self.opt.get("num_workers", 0))
        return StepLoader(self.train_items, batch_sampler=sampler, collate_fn=collate_train, num_workers=nw,
                          persistent_workers=False)

    def val_dataloader(self):
        return self._val_loader if self._val_loader is not None else []

    # -- steps -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x, cached=self.cached)

    def on_train_batch_start(self, batch, batch_idx):
        from ssl_pipeline.models.views import mix_seed

        torch.manual_seed(mix_seed(self.seed, 5, self.global_step, self.global_rank))

    def _sup_loss(self, logits, y, w):
        # weighted mean over the global batch (DDP averages the ranks' gradients)
        return ddp_weighted(self, supervised_loss(self.loss_fn, loss_kind(self.loss_fn), logits, y, w), w)

    def _contrastive_loss(self, e, y, w, q=None):
        """SamToNe: embeddings e (B, D) vs their class rows; soft targets weight each pair by q's mass on y."""
        if q is not None:
            w = w * q.gather(1, y[:, None]).squeeze(1)
        table = nn.functional.normalize(self.net.head[-1].weight, dim=-1)
        loss = self.loss_fn(e, table[y], pos_mask=y[:, None] == y[None, :], weight=w)
        return ddp_weighted(self, loss, w)

    def _simcse_loss(self, x_weak, e_weak, e_strong):
        """SimCSE++ on the unlabeled images: (weak, strong) views through dropout, off-dropout weak pass negatives."""
        from ssl_pipeline.models.contrastive import _is_dropout_like, off_dropout

        p = float(self.opt.get("simcse_dropout", 0.0))
        z1 = nn.functional.dropout(e_weak, p, training=True)
        z2 = nn.functional.dropout(e_strong, p, training=True)
        def active(m):  # a dropout-like module of the tower that drops something now
            return _is_dropout_like(m) and m.training and float(getattr(m, "p", getattr(m, "drop_prob", 1.0)) or 0) > 0

        if any(active(m) for m in self.net.visual.modules()):
            with off_dropout(self.net):  # the tower's own dropout off as well
                z_neg = self.net.embed(x_weak, cached=self.cached)
        else:  # no dropout inside the tower: its pass is already the dropout-off one
            z_neg = e_weak
        return self.unsup(z1, z2, z_neg)

    def training_step(self, batch, batch_idx):
        x, y, w, code = batch[:4]
        e = self.net.embed(x, cached=self.cached)
        logits = self.net.head(e)
        sup = code < 10
        q = batch[4][sup] if len(batch) > 4 else None  # soft targets: CE against a distribution
        if self.kind == "contrastive":
            loss = self._contrastive_loss(e[sup], y[sup], w[sup], q)
        else:
            loss = self._sup_loss(logits[sup], q if q is not None else y[sup], w[sup])
        pseudo = code == 1
        self.log("train/loss_sup", loss.detach(), on_step=True, on_epoch=False)
        self.log("pseudo/weight_mean", w[pseudo].mean() if pseudo.any() else torch.zeros(()), on_step=True,
                 on_epoch=False)
        lam = float(self.opt.get("consistency_weight", 0.0))
        weak, strong = code == 10, code == 20
        if lam > 0 and weak.any():
            with torch.no_grad():
                p = torch.softmax(logits[weak].detach().float(), dim=-1)
                conf, target = p.max(-1)
                mask = (conf >= float(self.opt.get("threshold", 0.95))).float()
            ce = nn.functional.cross_entropy(logits[strong], target, reduction="none")
            loss_u = (ce * mask).mean()
            loss = loss + lam * loss_u
            self.log("train/loss_unlabeled", loss_u.detach(), on_step=True, on_epoch=False)
            self.log("train/mask_rate", mask.mean(), on_step=True, on_epoch=False)
        mu = float(self.opt.get("simcse_weight", 0.0))
        if self.unsup is not None and mu > 0 and int(weak.sum()) >= 2:
            loss_s = self._simcse_loss(x[weak], e[weak], e[strong])
            loss = loss + mu * loss_s
            self.log("train/loss_simcse", loss_s.detach(), on_step=True, on_epoch=False)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        self._update_ema()  # here, not in on_train_batch_end: checkpoint callbacks run before that hook

    def _update_ema(self) -> None:
        if self._ema is not None:
            d = float(self.opt["ema"])
            with torch.no_grad():
                for k, v in self._ema_source().items():
                    e = self._ema[k]
                    if e.device != v.device:
                        e = self._ema[k] = e.to(v.device)
                    if v.dtype.is_floating_point and k in self._ema_trainable:
                        e.mul_(d).add_(v.detach(), alpha=1 - d)
                    else:
                        e.copy_(v)

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        with self.ema_weights():
            acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, on_step=False, on_epoch=True, batch_size=len(y))

    # -- EMA -------------------------------------------------------------------------------
    def _ema_source(self) -> dict[str, torch.Tensor]:
        """Parameters that train, and buffers (BatchNorm statistics), by name."""
        trainable = {k for k, p in self.net.named_parameters() if p.requires_grad}
        self._ema_trainable = trainable
        src = {k: p for k, p in self.net.named_parameters() if k in trainable}
        src.update({k: b for k, b in self.net.named_buffers()})
        return src

    def ema_weights(self):
        """Context manager: the EMA weights are in the net inside it (no-op without EMA)."""
        import contextlib

        if self._ema is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def swap():
            src = self._ema_source()
            saved = {k: v.detach().clone() for k, v in src.items()}
            with torch.no_grad():
                for k, v in src.items():
                    v.copy_(self._ema[k])
            try:
                yield
            finally:
                with torch.no_grad():
                    for k, v in src.items():
                        v.copy_(saved[k])
        return swap()

    def apply_ema(self) -> None:
        """Put the EMA weights into the net for good (the final model)."""
        if self._ema is not None:
            with torch.no_grad():
                for k, v in self._ema_source().items():
                    v.copy_(self._ema[k])

    def on_save_checkpoint(self, checkpoint):
        if self._ema is not None:
            checkpoint["ema"] = {k: v.detach().cpu() for k, v in self._ema.items()}

    def on_load_checkpoint(self, checkpoint):
        if self._ema is not None and "ema" in checkpoint:
            self._ema = {k: v.clone() for k, v in checkpoint["ema"].items()}

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        import math

        o = self.opt
        groups = self.net.param_groups(float(o["lr"]), float(o["backbone_lr"]), float(o["weight_decay"]),
                                       float(o.get("layer_decay", 1.0)))
        opt = torch.optim.AdamW(groups)
        steps = int(o["steps"])
        warm = max(1, int(round(float(o.get("warmup", 0.05)) * steps)))

        def factor(step: int) -> float:  # linear warm-up, then cosine to zero
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
