"""LightningModules: a head on cached embeddings (and, in retrain.mode=finetune, a tower on images)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from ssl_pipeline.models.heads import make_head


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy (B, C) x (B,) with per-sample weights (B,), normalised by the weight sum."""
    loss = nn.functional.cross_entropy(logits, target, reduction="none")
    if weight is None:
        return loss.mean()
    return (loss * weight).sum() / weight.sum().clamp_min(1e-12)


class HeadModule(L.LightningModule):
    """A classification head trained on (embedding, label, weight) triples.

    Batches are ``(x (B, D) float, y (B,) int, w (B,) float)``; pseudo-labels carry
    their confidence as weight, given labels weight 1.

    Parameters
    ----------
    in_dim, n_classes : int
    head : str
        ``linear`` or ``mlp``.
    loss : callable(logits, target, weight) -> scalar, default confidence-weighted CE
    """

    def __init__(self, in_dim: int, n_classes: int, head: str = "linear", hidden: int = 512, lr: float = 1e-3,
                 weight_decay: float = 1e-4, dropout: float = 0.0, loss=None, max_steps: int = 1000):
        super().__init__()
        self.save_hyperparameters(ignore=["loss"])
        self.head = make_head(head, in_dim, n_classes, hidden, dropout)
        self.loss_fn = loss or weighted_ce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def training_step(self, batch, batch_idx):
        x, y, w = batch
        loss = self.loss_fn(self(x), y, w)
        self.log("train/loss", loss, prog_bar=False, on_step=False, on_epoch=True)
        self.log("pseudo/weight_mean", w.mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        acc = (self(x).argmax(-1) == y).float().mean()
        self.log("val/acc", acc, prog_bar=True, on_epoch=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.hparams.max_steps,
                                                    pct_start=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
