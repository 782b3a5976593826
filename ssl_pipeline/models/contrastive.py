"""Contrastive and retrieval losses, one ``nn.Module`` each (CE and ASL: :mod:`ssl_pipeline.models.losses`).

* ``samtone``: :class:`SamToNeLoss`, contrastive loss with same-tower negatives (in retrain=head:
  images vs a learnable class table);
* ``simcse_pp``: :class:`SimCSEPPLoss`, off-dropout negatives plus dimension-wise contrast
  (with :func:`off_dropout_forward` for the dropout-off pass);
* ``psl``, ``unidec``: the multi-label retrieval losses of :mod:`ssl_pipeline.models.retrieval`.

Formulas follow ``papers-digest.md`` (sections 2.3, 3.4, 4.2, 5.2-5.3); the parts the digest
marks UNVERIFIED are design choices, documented per class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _upcast(x: Tensor) -> Tensor:
    """Half precision to float32 (logsumexp and D x D products need it); other dtypes kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero_like_graph(x: Tensor) -> Tensor:
    """A scalar 0 that stays attached to ``x``'s graph (so ``backward`` still works)."""
    return x.sum() * 0.0



# ---------------------------------------------------------------------------------------
# 3. SamToNe: contrastive loss with same-tower negatives
# ---------------------------------------------------------------------------------------


class SamToNeLoss(nn.Module):
    """In-batch contrastive loss with same-tower negatives (Moiseev et al., 2023).

    For the direction a -> b, row i of ``a`` has the positive ``b_i`` and the
    negatives ``b_j`` (cross tower) and ``a_j`` for j != i (same tower)::

        L_ab = -1/B sum_i log( e^{s(a_i,b_i)} / ( sum_j e^{s(a_i,b_j)} + sum_{j!=i} e^{s(a_i,a_j)} ) )

    with ``s = cos / tau``. ``L_ba`` swaps the towers; the bidirectional loss is
    their mean. With ``same_tower=False`` this is the plain (CLIP) InfoNCE.

    Parameters
    ----------
    tau : float
        Temperature (the digest leaves it as a tuned hyperparameter).
    learn_scale : bool
        Learn the logit scale ``1/tau`` instead (CLIP style: a log-scale parameter
        initialised at ``log(1/tau)``, clamped at ``max_scale``).
    max_scale : float
        Upper bound of the learned scale.
    same_tower : bool
        Add the same-tower negatives (the SamToNe term).
    bidirectional : bool
        Average a -> b and b -> a; otherwise only a -> b.
    dup_margin : float or None
        Same-tower pairs whose cosine similarity exceeds this margin are treated as
        near duplicates and removed from the negatives (cross-tower terms unchanged).

    Shapes
    ------
    a : (B, D) embeddings of tower a (e.g. images); L2-normalised inside
    b : (B, D) embeddings of tower b (e.g. texts); row i pairs with ``a[i]``
    pos_mask : (B, B) bool, optional
        ``pos_mask[i, j]`` marks i and j as positives of each other (e.g. images
        with the same label). Such pairs (i != j) are removed from the negatives of
        both towers and both directions; the relation is symmetrised
        (``pos_mask | pos_mask.T``). The numerator stays the paired ``b_i``.
    returns : () scalar
    """

    def __init__(self, tau: float = 0.05, learn_scale: bool = False, max_scale: float = 100.0,
                 same_tower: bool = True, bidirectional: bool = True,
                 dup_margin: float | None = None) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = tau
        self.max_scale = max_scale
        self.same_tower = same_tower
        self.bidirectional = bidirectional
        self.dup_margin = dup_margin
        if learn_scale:
            self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / tau)))
        else:
            self.register_parameter("log_scale", None)

    @property
    def scale(self) -> Tensor:
        """The logit scale 1/tau (a tensor; learnable with ``learn_scale=True``)."""
        if self.log_scale is None:
            return torch.tensor(1.0 / self.tau)
        return self.log_scale.exp().clamp(max=self.max_scale)

    def _direction(self, x: Tensor, y: Tensor, not_neg: Tensor, scale: Tensor,
                   weight: Tensor | None = None) -> Tensor:
        """Loss of anchors ``x`` against cross-tower ``y`` and same-tower ``x``."""
        n = x.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        cross = (x @ y.T) * scale
        cross = cross.masked_fill(not_neg & ~eye, float("-inf"))
        logits = [cross]
        if self.same_tower:
            sim = x @ x.T
            drop = not_neg | eye
            if self.dup_margin is not None:
                drop = drop | (sim.detach() > self.dup_margin)
            logits.append((sim * scale).masked_fill(drop, float("-inf")))
        target = torch.arange(n, device=x.device)
        if weight is None:
            return F.cross_entropy(torch.cat(logits, dim=1), target)
        per = F.cross_entropy(torch.cat(logits, dim=1), target, reduction="none")
        return (per * weight).sum() / weight.sum().clamp_min(1e-12)

    def forward(self, a: Tensor, b: Tensor, pos_mask: Tensor | None = None, weight: Tensor | None = None) -> Tensor:
        """Scalar loss; ``weight`` (B,) optional per-pair weights (weighted mean over anchors, both directions)."""
        if a.ndim != 2 or a.shape != b.shape:
            raise ValueError(f"expected a and b of the same shape (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")
        n = a.shape[0]
        a = F.normalize(a, dim=-1)
        b = F.normalize(b, dim=-1)
        if pos_mask is None:
            not_neg = torch.zeros(n, n, dtype=torch.bool, device=a.device)
        else:
            if pos_mask.shape != (n, n):
                raise ValueError(f"pos_mask must have shape ({n}, {n}), got {tuple(pos_mask.shape)}")
            not_neg = pos_mask.to(device=a.device, dtype=torch.bool)
            not_neg = not_neg | not_neg.T
        scale = self.scale.to(a.device, a.dtype)
        loss = self._direction(a, b, not_neg, scale, weight)
        if self.bidirectional:
            loss = 0.5 * (loss + self._direction(b, a, not_neg, scale, weight))
        return loss


# ---------------------------------------------------------------------------------------
# 4. SimCSE++: off-dropout negatives + dimension-wise contrastive learning
# ---------------------------------------------------------------------------------------


def _is_dropout_like(m: nn.Module) -> bool:
    """True for modules whose train mode only means 'drop something at random'.

    Covers every ``torch.nn`` dropout class, ``nn.MultiheadAttention`` (its
    attention dropout), and DropPath / stochastic-depth / patch-dropout modules
    from other libraries, recognised by name plus a ``drop_prob``, ``p`` or
    ``prob`` attribute.
    """
    if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)):
        return True
    if hasattr(m, "drop_prob"):
        return True
    name = type(m).__name__.lower()
    return ("drop" in name or "stochasticdepth" in name) and any(hasattr(m, a) for a in ("p", "prob"))


@contextmanager
def off_dropout(module: nn.Module) -> Iterator[nn.Module]:
    """Context manager: every dropout-like submodule of ``module`` in eval mode.

    Only the dropout-like modules change (BatchNorm and the rest keep their
    mode), and each gets back its own previous ``training`` flag on exit, also
    when the body raises.
    """
    saved = [(m, m.training) for m in module.modules() if _is_dropout_like(m)]
    try:
        for m, _ in saved:
            m.training = False   # not m.eval(): that would recurse into children
        yield module
    finally:
        for m, was_training in saved:
            m.training = was_training


def off_dropout_forward(module: nn.Module, *args, **kwargs):
    """Run ``module(*args, **kwargs)`` with dropout off (see :func:`off_dropout`).

    Gradients are kept (SimCSE++ back-propagates through the off-dropout pass);
    wrap the call in ``torch.no_grad()`` to save memory if they are not wanted.
    """
    with off_dropout(module):
        return module(*args, **kwargs)


def dimension_contrastive_loss(z1: Tensor, z2: Tensor, tau_d: float = 5.0, eps: float = 1e-5) -> Tensor:
    """Dimension-wise contrastive loss (DCL, SimCSE++).

    Each dimension is standardised over the batch (``BatchNorm1d(affine=False)``
    in train mode: ``(z - mean) / sqrt(biased var + eps)``), then with
    ``C = z1n^T z2n / (N * tau_d)`` (D, D)::

        L_DCL = 1/D sum_k [ -C_kk + log sum_k' exp(C_kk') ]

    Shapes: z1, z2 (N, D) -> () scalar. N must be >= 2.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected z1 and z2 of the same shape (N, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    if n < 2:
        raise ValueError("DCL needs a batch of at least 2 samples")

    def standardise(z: Tensor) -> Tensor:
        z = _upcast(z)
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)

    c = standardise(z1).T @ standardise(z2) / (n * tau_d)
    return (torch.logsumexp(c, dim=1) - c.diagonal()).mean()


class SimCSEPPLoss(nn.Module):
    """SimCSE++ (Xu et al., EMNLP 2023): off-dropout negatives plus DCL.

    With ``s = cos / tau`` and ``m = pos_ratio``, sample i costs::

        l_i = -m s(z1_i, z2_i) + log( e^{m s(z1_i, z2_i)} + sum_{j!=i} e^{s(zbar_i, zbar_j)} )

    where ``zbar`` is the dropout-off pass (see :func:`off_dropout_forward`).
    ``L = mean_i l_i + dcl_weight * L_DCL(z1, z2)`` (:func:`dimension_contrastive_loss`).

    Parameters
    ----------
    tau : float
        Instance-level temperature (0.05).
    pos_ratio : float
        ``m``, the positive logit multiplier (1; the off-dropout-only script uses 0.9).
    dcl_weight : float
        Weight of the DCL term (0.1; 0 disables it).
    dcl_tau : float
        DCL temperature ``tau_d`` (5 with the instance loss, 20 for DCL alone).
    eps : float
        Variance epsilon of the batch standardisation.

    Shapes
    ------
    z1, z2 : (B, D) two dropout-on views of the same B inputs
    z_neg : (B, D), optional, the dropout-off pass. Without it the negatives are
        the standard SimCSE ones, ``s(z1_i, z2_j)`` for j != i.
    returns : () scalar, or (scalar, {"instance", "dcl"}) with ``return_terms=True``
    """

    def __init__(self, tau: float = 0.05, pos_ratio: float = 1.0, dcl_weight: float = 0.1,
                 dcl_tau: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if tau <= 0 or dcl_tau <= 0:
            raise ValueError("tau and dcl_tau must be > 0")
        self.tau = tau
        self.pos_ratio = pos_ratio
        self.dcl_weight = dcl_weight
        self.dcl_tau = dcl_tau
        self.eps = eps

    def instance_loss(self, z1: Tensor, z2: Tensor, z_neg: Tensor | None = None) -> Tensor:
        """The instance-level term alone: () scalar."""
        n = z1.shape[0]
        u1, u2 = F.normalize(_upcast(z1), dim=-1), F.normalize(_upcast(z2), dim=-1)
        pos = self.pos_ratio * (u1 * u2).sum(-1) / self.tau                       # (B,)
        if z_neg is None:
            neg = u1 @ u2.T / self.tau
        else:
            ub = F.normalize(_upcast(z_neg), dim=-1)
            neg = ub @ ub.T / self.tau
        eye = torch.eye(n, dtype=torch.bool, device=z1.device)
        neg = neg.masked_fill(eye, float("-inf"))
        logits = torch.cat([pos[:, None], neg], dim=1)
        return (torch.logsumexp(logits, dim=1) - pos).mean()

    def forward(self, z1: Tensor, z2: Tensor, z_neg: Tensor | None = None, return_terms: bool = False):
        if z1.ndim != 2 or z1.shape != z2.shape or (z_neg is not None and z_neg.shape != z1.shape):
            raise ValueError("z1, z2 (and z_neg) must all have the same shape (B, D)")
        inst = self.instance_loss(z1, z2, z_neg)
        if self.dcl_weight:
            dcl = dimension_contrastive_loss(z1, z2, self.dcl_tau, self.eps)
        else:
            dcl = torch.zeros((), device=z1.device)
        total = inst + self.dcl_weight * dcl
        if return_terms:
            return total, {"instance": inst.detach(), "dcl": dcl.detach()}
        return total
