"""Training losses for the retrain stage, one ``nn.Module`` each.

* ``ce``: :class:`ConfidenceWeightedCE`, single-label, pseudo-labels weighted by confidence;
* ``asl``: :class:`AsymmetricLoss`, multi-label with masked pseudo-labels (CAP / CSA);
* ``samtone``: :class:`SamToNeLoss`, image-text contrastive loss with same-tower negatives;
* ``simcse_pp``: :class:`SimCSEPPLoss`, off-dropout negatives plus dimension-wise contrast
  (with :func:`off_dropout_forward` for the dropout-off pass);
* ``psl``: :class:`PSLLoss`, UniDEC pick-some-labels loss for one head;
* ``unidec``: :class:`UniDECLoss`, UniDEC dual-encoder + classifier heads (hard negatives
  come from :class:`ssl_pipeline.models.hard_negatives.HardNegativeMiner`).

``LOSSES`` maps each name to its class and ``get_loss(name, **kw)`` builds one.
Formulas follow ``papers-digest.md`` (sections 2.3, 3.4, 4.2, 5.2-5.3); the
parts the digest marks UNVERIFIED are design choices, documented per class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def _upcast(x: Tensor) -> Tensor:
    """Half precision to float32 (logsumexp and D x D products need it); other dtypes kept."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _zero_like_graph(x: Tensor) -> Tensor:
    """A scalar 0 that stays attached to ``x``'s graph (so ``backward`` still works)."""
    return x.sum() * 0.0


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


# ---------------------------------------------------------------------------------------
# 5. UniDEC: pick-some-labels (PSL) and the dual-head loss
# ---------------------------------------------------------------------------------------


def sample_positives(pos: Tensor, max_pos: int | None, generator: torch.Generator | None = None) -> Tensor:
    """Keep at most ``max_pos`` positives per row, chosen uniformly at random.

    Shapes: pos (B, P) bool -> (B, P) bool, a subset of ``pos``. The random
    numbers are drawn on the CPU from ``generator`` so results do not depend on
    the device.
    """
    pos = pos.to(torch.bool)
    if max_pos is None or pos.shape[1] == 0:
        return pos
    if max_pos < 1:
        raise ValueError(f"max_pos must be >= 1, got {max_pos}")
    counts = pos.sum(1)
    if int(counts.max()) <= max_pos:
        return pos
    # O(number of positives): a random key per positive, rank the keys within each row
    rows, cols = pos.nonzero(as_tuple=True)                  # row-major, so grouped by row
    key = torch.rand(rows.shape[0], generator=generator, dtype=torch.float64).to(pos.device)
    order = torch.argsort(rows.to(torch.float64) * 2.0 + key)
    rows, cols = rows[order], cols[order]
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.shape[0], device=pos.device) - start[rows]
    keep = rank < max_pos
    out = torch.zeros_like(pos)
    out[rows[keep], cols[keep]] = True
    return out


def psl_loss_from_scores(scores: Tensor, pos: Tensor, selected: Tensor | None = None,
                         decoupled: bool = True) -> Tensor:
    """PSL loss from a (B, P) score matrix (already divided by the temperature).

    ``pos`` (B, P) bool marks every positive of query i in the pool (``P_i``);
    ``selected`` (B, P) bool, a subset of it, the sampled positives ``S_i``
    (defaults to ``pos``). Negatives of i are the pool entries not in ``P_i``::

        l_ip = -log( e^{s_ip} / (e^{s_ip} + sum_{l not in P_i} e^{s_il}) )     (decoupled)
        l_ip = -log( e^{s_ip} / sum_{l in pool} e^{s_il} )                      (PAL, decoupled=False)
        L = mean over queries with |S_i| >= 1 of (1/|S_i|) sum_{p in S_i} l_ip

    Returns a () scalar, 0 (attached to the graph) if no query has a positive.
    """
    if scores.ndim != 2 or pos.shape != scores.shape:
        raise ValueError(f"expected scores and pos of the same shape (B, P), got {tuple(scores.shape)} "
                         f"and {tuple(pos.shape)}")
    pos = pos.to(torch.bool)
    sel = pos if selected is None else selected.to(torch.bool) & pos
    n_sel = sel.sum(1)
    valid = n_sel > 0
    if not bool(valid.any()):
        return _zero_like_graph(scores)
    s = _upcast(scores)
    rows, cols = sel.nonzero(as_tuple=True)
    if decoupled:
        neg = ~pos
        has_neg = neg.any(1)
        neg_scores = s.masked_fill(pos, float("-inf"))
        # rows without a negative: logsumexp of all -inf has a NaN gradient, so feed
        # zeros there and put -inf back afterwards (torch.where sends them no gradient)
        neg_lse = torch.logsumexp(torch.where(has_neg[:, None], neg_scores, torch.zeros_like(s)), dim=1)
        neg_lse = torch.where(has_neg, neg_lse, torch.full_like(neg_lse, float("-inf")))
        # -log(e^s / (e^s + N)) = log(1 + N e^{-s}) = softplus(log N - s)
        per_entry = F.softplus(neg_lse[rows] - s[rows, cols])
    else:
        per_entry = torch.logsumexp(s, dim=1)[rows] - s[rows, cols]
    per_query = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device).index_add(0, rows, per_entry)
    return (per_query[valid] / n_sel[valid].to(s.dtype)).mean()


class PSLLoss(nn.Module):
    """UniDEC pick-some-labels loss for one dual-encoder head.

    Scores are ``s_ip = cos(q_i, L_p) / tau`` over a shared in-batch label pool
    (the union of the batch's positives and mined hard negatives). Several
    positives per query count, each against the negatives of that query only:
    the other positives of i are kept out of its denominator (the "decoupled"
    form; ``decoupled=False`` gives pick-all-labels, PAL). See
    :func:`psl_loss_from_scores` for the formula.

    Parameters
    ----------
    tau : float
        Temperature.
    max_pos_per_query : int or None
        ``beta``: at most this many positives per query are sampled into ``S_i``
        (the unsampled ones are still not negatives). None keeps all.
    decoupled : bool
        Exclude other positives from the denominator (default) or not (PAL).
    normalize : bool
        L2-normalise q and L (cosine scores). False gives raw dot products.
    seed : int
        Seed of the CPU ``torch.Generator`` used to sample positives.

    Shapes
    ------
    q : (B, D) query embeddings
    labels : (P, D) embeddings of the batch label pool
    pos : (B, P) bool, ``pos[i, p]`` = pool label p is a positive of query i
    generator : torch.Generator, optional, overrides the module's own
    returns : () scalar
    """

    def __init__(self, tau: float = 0.05, max_pos_per_query: int | None = None, decoupled: bool = True,
                 normalize: bool = True, seed: int = 0) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.tau = tau
        self.max_pos_per_query = max_pos_per_query
        self.decoupled = decoupled
        self.normalize = normalize
        self.generator = torch.Generator().manual_seed(seed)

    def scores(self, q: Tensor, labels: Tensor) -> Tensor:
        """(B, P) scores ``<q_i, L_p> / tau`` (cosine if ``normalize``)."""
        if self.normalize:
            q, labels = F.normalize(q, dim=-1), F.normalize(labels, dim=-1)
        return q @ labels.T / self.tau

    def forward(self, q: Tensor, labels: Tensor, pos: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        if q.ndim != 2 or labels.ndim != 2 or pos.shape != (q.shape[0], labels.shape[0]):
            raise ValueError(f"expected q (B, D), labels (P, D), pos (B, P); got {tuple(q.shape)}, "
                             f"{tuple(labels.shape)}, {tuple(pos.shape)}")
        sel = sample_positives(pos, self.max_pos_per_query, generator or self.generator)
        return psl_loss_from_scores(self.scores(q, labels), pos, sel, self.decoupled)


class UniDECLoss(nn.Module):
    """UniDEC: PSL on a dual-encoder head plus PSL on a classifier head.

    ``L = L_DE + lam * L_CLF`` where both use the same label pool, positive mask
    and sampled positives ``S_i``:

    * DE head: ``s = cos(q_de_i, label_de_p) / tau_de``;
    * classifier head: ``s = <q_clf_i, W[pool_ids[p]]> / tau_clf`` (unnormalised;
      ``W`` is (L_total, d), one row per label of the whole label space).

    ``W`` is either owned by the loss (give ``num_labels`` and ``clf_dim``; an
    ``nn.Embedding``, optionally with sparse gradients so that only the pooled
    rows are updated, which suits very large label spaces) or passed to
    ``forward`` as ``clf_weight``.

    Parameters
    ----------
    num_labels, clf_dim : int, optional
        Size of the owned classifier matrix W.
    lam : float
        Weight of the classifier loss (the digest: UNVERIFIED, try 1).
    tau_de, tau_clf : float
        Temperatures of the two heads.
    max_pos_per_query : int or None
        PSL positive budget ``beta``.
    decoupled : bool
        Decoupled PSL (default) or PAL denominators.
    sparse_grad : bool
        Sparse gradients for the owned W (needs e.g. ``torch.optim.SparseAdam``).
    seed : int
        Seed of the positive sampling generator.

    Shapes
    ------
    q_de : (B, D) DE-head query embeddings
    label_de : (P, D) DE-head embeddings of the pool labels
    pos : (B, P) bool
    q_clf : (B, d) classifier-head query features, optional (no CLF term without it)
    pool_ids : (P,) int64 label ids of the pool in [0, L_total), needed with q_clf
    clf_weight : (L_total, d), optional, overrides the owned W
    returns : () scalar, or (scalar, {"de", "clf"}) with ``return_terms=True``
    """

    def __init__(self, num_labels: int | None = None, clf_dim: int | None = None, lam: float = 1.0,
                 tau_de: float = 0.05, tau_clf: float = 1.0, max_pos_per_query: int | None = None,
                 decoupled: bool = True, sparse_grad: bool = False, seed: int = 0) -> None:
        super().__init__()
        if (num_labels is None) != (clf_dim is None):
            raise ValueError("give both num_labels and clf_dim (owned classifier) or neither")
        self.lam = lam
        self.tau_de = tau_de
        self.tau_clf = tau_clf
        self.max_pos_per_query = max_pos_per_query
        self.decoupled = decoupled
        self.generator = torch.Generator().manual_seed(seed)
        if num_labels is not None:
            self.classifier = nn.Embedding(num_labels, clf_dim, sparse=sparse_grad)
            nn.init.normal_(self.classifier.weight, std=clf_dim ** -0.5)
        else:
            self.classifier = None

    @torch.no_grad()
    def init_classifier_from(self, label_emb: Tensor) -> None:
        """Copy (L_total, d) label embeddings into the owned classifier matrix."""
        if self.classifier is None:
            raise ValueError("this UniDECLoss owns no classifier (num_labels/clf_dim not given)")
        self.classifier.weight.copy_(label_emb)

    def forward(self, q_de: Tensor, label_de: Tensor, pos: Tensor, q_clf: Tensor | None = None,
                pool_ids: Tensor | None = None, clf_weight: Tensor | None = None,
                generator: torch.Generator | None = None, return_terms: bool = False):
        if pos.shape != (q_de.shape[0], label_de.shape[0]):
            raise ValueError(f"pos must have shape (B, P) = ({q_de.shape[0]}, {label_de.shape[0]}), "
                             f"got {tuple(pos.shape)}")
        sel = sample_positives(pos, self.max_pos_per_query, generator or self.generator)
        s_de = F.normalize(q_de, dim=-1) @ F.normalize(label_de, dim=-1).T / self.tau_de
        l_de = psl_loss_from_scores(s_de, pos, sel, self.decoupled)
        if q_clf is None or self.lam == 0:
            l_clf = torch.zeros((), device=q_de.device)
        else:
            if pool_ids is None:
                raise ValueError("pool_ids (P,) are needed to pick the classifier rows")
            if clf_weight is not None:
                w = clf_weight[pool_ids]
            elif self.classifier is not None:
                w = self.classifier(pool_ids)
            else:
                raise ValueError("no classifier weights: pass clf_weight or build the loss with num_labels")
            s_clf = q_clf @ w.T / self.tau_clf
            l_clf = psl_loss_from_scores(s_clf, pos, sel, self.decoupled)
        total = l_de + self.lam * l_clf
        if return_terms:
            return total, {"de": l_de.detach(), "clf": l_clf.detach()}
        return total


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
