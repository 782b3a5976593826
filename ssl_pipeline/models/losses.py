"""Training losses for the retrain stage, one ``nn.Module`` each.

* ``ce``: :class:`ConfidenceWeightedCE`, single-label, pseudo-labels weighted by confidence;
* ``asl``: :class:`AsymmetricLoss`, multi-label with masked pseudo-labels (CAP / CSA);
* ``samtone``, ``simcse_pp``, ``psl``, ``unidec``: the contrastive and retrieval losses of
  :mod:`ssl_pipeline.models.contrastive` and :mod:`ssl_pipeline.models.retrieval` (imported here too).

``LOSSES`` maps each name to its class and ``get_loss(name, **kw)`` builds one.
Formulas follow ``papers-digest.md`` (sections 2.3, 3.4, 4.2, 5.2-5.3); the
parts the digest marks UNVERIFIED are design choices, documented per class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_pipeline.models.contrastive import (
    SamToNeLoss,
    SimCSEPPLoss,
    _zero_like_graph,
    dimension_contrastive_loss,
    off_dropout,
    off_dropout_forward,
)
from ssl_pipeline.models.retrieval import PSLLoss, UniDECLoss, psl_loss_from_scores, sample_positives

__all__ = [
    "LOSSES",
    "AsymmetricLoss",
    "ConfidenceWeightedCE",
    "PSLLoss",
    "SamToNeLoss",
    "SimCSEPPLoss",
    "UniDECLoss",
    "dimension_contrastive_loss",
    "get_loss",
    "off_dropout",
    "off_dropout_forward",
    "psl_loss_from_scores",
    "sample_positives",
]



# ---------------------------------------------------------------------------------------
# 1. confidence-weighted cross-entropy
# ---------------------------------------------------------------------------------------


class ConfidenceWeightedCE(nn.Module):
    """Cross-entropy with a weight per sample, e.g. the confidence of a pseudo-label.

    ``loss = sum_i w_i * ce_i / sum_i w_i``; with no weights this is the plain mean.

    Parameters
    ----------
    label_smoothing : float
        As in :func:`torch.nn.functional.cross_entropy`: the target is
        ``(1 - eps) * one_hot + eps / C``.
    ignore_index : int
        Targets equal to this value get weight 0 (e.g. ``-1`` for unlabeled rows).

    Shapes
    ------
    logits : (B, C) float
    target : (B,) int64 class ids
    weight : (B,) float, optional, >= 0
    returns : () scalar; 0 (still differentiable) when every weight is 0
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(f"expected logits (B, C) and target (B,), got {tuple(logits.shape)} "
                             f"and {tuple(target.shape)}")
        valid = target != self.ignore_index
        w = torch.ones_like(target, dtype=logits.dtype) if weight is None else weight.to(logits.dtype)
        if w.shape != target.shape:
            raise ValueError(f"weight must have shape (B,) = {tuple(target.shape)}, got {tuple(w.shape)}")
        if (w < 0).any():
            raise ValueError("sample weights must be >= 0")
        w = w * valid
        per_sample = F.cross_entropy(logits, target.masked_fill(~valid, 0), reduction="none",
                                     label_smoothing=self.label_smoothing)
        total = w.sum()
        if total <= 0:
            return _zero_like_graph(logits)
        return (w * per_sample).sum() / total


# ---------------------------------------------------------------------------------------
# 2. asymmetric loss (ASL) for multi-label
# ---------------------------------------------------------------------------------------


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., ICCV 2021) for multi-label targets.

    With ``p = sigmoid(logit)`` and the shifted negative probability
    ``p_m = max(p - clip, 0)``, each entry costs::

        y = 1:  -(1 - p)   ** gamma_pos * log(p)
        y = 0:  -p_m       ** gamma_neg * log(1 - p_m)

    (logs clamped at ``eps``). Entries outside ``mask`` cost nothing, and each
    row is multiplied by its sample ``weight``.

    Parameters
    ----------
    gamma_neg, gamma_pos : float
        Focusing exponents for negatives and positives (CAP: 4 and 0).
    clip : float
        Probability margin subtracted from negatives; 0 disables shifting.
    eps : float
        Lower clamp inside the logs.
    reduction : {"batchmean", "sum", "mean", "none"}
        ``batchmean`` (default): sum over counted entries divided by the number of
        samples B (all rows of the batch, also rows with no counted entry), so the
        scale does not depend on how many entries a mask keeps. ``sum``: the plain
        sum (the official ASL code). ``mean``: sum divided by the number of counted
        entries. ``none``: the (B, C) matrix of per-entry losses (0 where masked).
    focal_grad : bool
        If False the focusing weight is treated as a constant in backward.

    Shapes
    ------
    logits : (B, C) float
    targets : (B, C) in {0, 1} (bool, int or float)
    mask : (B, C) bool or {0, 1}, optional; True = the entry counts
    weight : (B,) float, optional
    returns : () scalar, or (B, C) with ``reduction="none"``
    """

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 eps: float = 1e-8, reduction: str = "batchmean", focal_grad: bool = True) -> None:
        super().__init__()
        if reduction not in ("batchmean", "sum", "mean", "none"):
            raise ValueError(f"unknown reduction {reduction!r}; valid: batchmean, sum, mean, none")
        if clip < 0:
            raise ValueError(f"clip must be >= 0, got {clip}")
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.reduction = reduction
        self.focal_grad = focal_grad

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None,
                weight: Tensor | None = None) -> Tensor:
        if logits.ndim != 2 or targets.shape != logits.shape:
            raise ValueError(f"expected logits and targets of the same shape (B, C), got "
                             f"{tuple(logits.shape)} and {tuple(targets.shape)}")
        y = targets.to(logits.dtype)
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        log_pos = torch.log(p.clamp(min=self.eps))
        log_neg = torch.log((1 - p_neg).clamp(min=self.eps))
        entry = y * log_pos + (1 - y) * log_neg
        if self.gamma_neg > 0 or self.gamma_pos > 0:
            with torch.set_grad_enabled(self.focal_grad and torch.is_grad_enabled()):
                base = y * (1 - p) + (1 - y) * p_neg        # 1 - p_t
                gamma = y * self.gamma_pos + (1 - y) * self.gamma_neg
                focus = torch.pow(base, gamma)
            entry = entry * focus
        loss = -entry
        if mask is not None:
            if mask.shape != logits.shape:
                raise ValueError(f"mask must have shape {tuple(logits.shape)}, got {tuple(mask.shape)}")
            loss = loss * mask.to(loss.dtype)
        if weight is not None:
            if weight.shape != logits.shape[:1]:
                raise ValueError(f"weight must have shape (B,) = ({logits.shape[0]},), got {tuple(weight.shape)}")
            loss = loss * weight.to(loss.dtype)[:, None]
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "mean":
            n = mask.to(loss.dtype).sum() if mask is not None else loss.new_tensor(float(loss.numel()))
            return loss.sum() / n.clamp(min=1)
        return loss.sum() / max(logits.shape[0], 1)


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------

LOSSES: dict[str, type[nn.Module]] = {
    "ce": ConfidenceWeightedCE,
    "asl": AsymmetricLoss,
    "samtone": SamToNeLoss,
    "simcse_pp": SimCSEPPLoss,
    "psl": PSLLoss,
    "unidec": UniDECLoss,
}


def get_loss(name: str, **kw) -> nn.Module:
    """Build the loss registered as ``name`` in :data:`LOSSES` with keyword arguments ``kw``."""
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}") from None
    return cls(**kw)
