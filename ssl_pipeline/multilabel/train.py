"""Training the alignment head on cached tokens with Lightning: labeled only, or with refreshed pseudo-labels.

One optimizer step sees ``batch_labeled`` labeled images and, after
``warmup_steps``, ``batch_unlabeled`` unlabeled ones. Every ``refresh_every``
steps the EMA teacher re-scores all unlabeled images and the pseudo-labels are
rebuilt (``refresh(teacher) -> PseudoLabels``, supplied by the caller). The
student sees randomly dropped spatial tokens (a feature-level strong
augmentation); the teacher sees all tokens. Loss::

    L = ASL(labeled) + ctx_w * BCE(context | labeled)
        + lam_u * (ASL(unlabeled, counted entries) + ctx_w * BCE(pseudo-context | unlabeled))

(ASL from :mod:`ssl_pipeline.models.losses`; the unlabeled ASL is scaled by
``batch_labeled / batch_unlabeled`` so both parts are per-labeled-batch sums.)
The labeled-only model is the same module with ``refresh=None``: same seed,
steps, schedule, augmentation and EMA.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch import Tensor

from ssl_pipeline.models.losses import AsymmetricLoss
from ssl_pipeline.multilabel.head import AlignmentHead
from ssl_pipeline.multilabel.pseudo import PseudoLabels

log = logging.getLogger(__name__)


class _StepBatches(torch.utils.data.Dataset):
    """Item i = (labeled positions (B_l,), unlabeled positions (B_u,)) of step i, drawn with a seeded rng."""

    def __init__(self, n_lab: int, n_unl: int, steps: int, b_lab: int, b_unl: int, seed: int):
        rng = np.random.default_rng(seed)
        self.lab = rng.integers(0, n_lab, (steps, b_lab))
        self.unl = rng.integers(0, max(n_unl, 1), (steps, b_unl)) if n_unl else np.zeros((steps, 0), np.int64)

    def __len__(self) -> int:
        return len(self.lab)

    def __getitem__(self, i: int):
        return torch.from_numpy(self.lab[i]), torch.from_numpy(self.unl[i])


class MultiLabelModule(L.LightningModule):
    """The alignment head with its EMA teacher, trained on labeled (+ pseudo-labeled) tokens.

    Parameters
    ----------
    head : AlignmentHead
    tokens_lab : (n_l, P, d) tensor (float16 is fine); y_lab : (n_l, C) 0/1; ctx_lab : (n_l, M) 0/1
    tokens_unl : (n_u, P, d) tensor or None
    refresh : callable(teacher) -> PseudoLabels, or None for labeled-only training
    settings : dict with lr, weight_decay, steps, warmup_steps, refresh_every, ema, token_keep_min,
        unlabeled_weight, context_weight, batch_labeled, batch_unlabeled, asl (dict)
    """

    def __init__(self, head: AlignmentHead, tokens_lab: Tensor, y_lab: Tensor, ctx_lab: Tensor,
                 tokens_unl: Tensor | None, refresh: Callable[[AlignmentHead], PseudoLabels] | None, settings: dict):
        super().__init__()
        self.head = head
        self.teacher = copy.deepcopy(head).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.tokens_lab, self.y_lab, self.ctx_lab = tokens_lab, y_lab.float(), ctx_lab.float()
        self.tokens_unl = tokens_unl
        self.refresh_fn = refresh
        self.s = settings
        self.asl = AsymmetricLoss(**settings.get("asl", {}), reduction="batchmean")
        self.pseudo: PseudoLabels | None = None
        self._y_unl = self._m_unl = self._c_unl = None
        self.history: list[dict] = []

    def _keep(self, b: int, p: int) -> Tensor | None:
        lo = float(self.s["token_keep_min"])
        if lo >= 1.0 or p < 2:
            return None
        r = torch.empty(b, 1).uniform_(lo, 1.0)
        keep = torch.rand(b, p) < r
        keep[torch.arange(b), torch.randint(0, p, (b,))] = True  # at least one token
        return keep

    def _semi_active(self) -> bool:
        return self.refresh_fn is not None and self.tokens_unl is not None and len(self.tokens_unl) > 0 \
            and self.global_step >= int(self.s["warmup_steps"])

    def on_train_batch_start(self, batch, batch_idx):
        if not self._semi_active():
            return
        since = self.global_step - int(self.s["warmup_steps"])
        if self.pseudo is None or since % int(self.s["refresh_every"]) == 0:
            self.pseudo = self.refresh_fn(self.teacher)
            self._y_unl = torch.from_numpy(self.pseudo.decision.astype(np.float32))
            self._m_unl = torch.from_numpy(self.pseudo.counted)
            self._c_unl = torch.from_numpy(self.pseudo.contexts)
            self.history.append({"step": int(self.global_step), "positives": int(self.pseudo.decision.sum()),
                                 "counted": float(self.pseudo.counted.mean()),
                                 "vetoed": int(self.pseudo.vetoed.sum())})

    def training_step(self, batch, batch_idx):
        li, ui = batch
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        x = self.tokens_lab[li]
        logits, ctx = self.head(x, self._keep(len(li), x.shape[1]))
        loss_l = self.asl(logits, self.y_lab[li])
        loss = loss_l + float(self.s["context_weight"]) * bce(ctx, self.ctx_lab[li])
        if self._semi_active() and len(ui):
            x = self.tokens_unl[ui]
            logits, ctx = self.head(x, self._keep(len(ui), x.shape[1]))
            lam = float(self.s["unlabeled_weight"])
            loss_u = self.asl(logits, self._y_unl[ui], self._m_unl[ui]) * len(li) / len(ui)
            loss = loss + lam * (loss_u + float(self.s["context_weight"]) * bce(ctx, self._c_unl[ui]))
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(li))
        return loss

    @torch.no_grad()
    def on_train_batch_end(self, outputs, batch, batch_idx):
        d = float(self.s["ema"]) if self.global_step > 20 else 0.0
        for pt, ps in zip(self.teacher.parameters(), self.head.parameters()):
            pt.mul_(d).add_(ps.detach(), alpha=1.0 - d)
        for bt, bs in zip(self.teacher.buffers(), self.head.buffers()):
            bt.copy_(bs)

    def configure_optimizers(self):
        params = [p for p in self.head.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(self.s["lr"]), weight_decay=float(self.s["weight_decay"]))
        from ssl_pipeline.models.module import one_cycle

        sched = one_cycle(opt, float(self.s["lr"]), int(self.s["steps"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fit(head: AlignmentHead, tokens_lab: Tensor, y_lab: Tensor, ctx_lab: Tensor, tokens_unl: Tensor | None,
        refresh: Callable[[AlignmentHead], PseudoLabels] | None, settings: dict, seed: int,
        trainer=None) -> MultiLabelModule:
    """Train for ``settings['steps']`` steps (seeded); return the module (its ``teacher`` is the EMA head).

    ``trainer``: the ``trainer`` config group (default one CPU device), through
    :func:`ssl_pipeline.engine.make_trainer`; under DDP every rank draws the same step batches, so the
    averaged gradients are those of one process.
    """
    from ssl_pipeline.engine import make_trainer

    L.seed_everything(seed, workers=True, verbose=False)
    module = MultiLabelModule(head, tokens_lab, y_lab, ctx_lab, tokens_unl, refresh, settings)
    steps = int(settings["steps"])
    ds = _StepBatches(len(tokens_lab), 0 if tokens_unl is None else len(tokens_unl), steps,
                      int(settings["batch_labeled"]), int(settings["batch_unlabeled"]), seed)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False)
    tr = make_trainer(trainer, max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, deterministic=False)
    tr.fit(module, loader)
    module.head.eval()
    module.teacher.eval()
    return module


@torch.no_grad()
def predict(head: AlignmentHead, tokens: Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores (n, C) and context scores (n, M) of ``tokens`` (n, P, d), all tokens kept."""
    head.eval()
    out, ctx = [], []
    for s in range(0, len(tokens), batch):
        a, b = head(tokens[s:s + batch])
        out.append(a.sigmoid())
        ctx.append(b.sigmoid())
    C = head.n_classes
    M = head.ctx.out_features
    if not out:
        return np.zeros((0, C), np.float32), np.zeros((0, M), np.float32)
    return torch.cat(out).numpy(), torch.cat(ctx).numpy()
