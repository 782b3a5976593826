"""SimCSE++ adaptation of frozen embeddings: a small residual projection trained without labels.

The projection (:class:`ResidualProjection`) maps a unit row ``x`` (D,) to
``normalise(x + W2 drop(gelu(W1 drop(x))))``; ``W2`` starts at zero, so the
untrained map is the identity and the adapted space starts as the frozen one.
Training (:class:`SimCSEPPAdapter`) follows SimCSE++ (papers-digest.md 5.2-5.3):
two dropout-on passes of a batch are the positives, a third pass with dropout off
gives the negatives (off-dropout), and the dimension-wise contrastive term (DCL)
decorrelates the output dimensions; the loss is
:class:`ssl_pipeline.models.contrastive.SimCSEPPLoss`.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_pipeline.models.contrastive import SimCSEPPLoss, off_dropout_forward

log = logging.getLogger(__name__)


class ResidualProjection(nn.Module):
    """``x -> normalise(x + W2 drop(gelu(W1 drop(x))))``: (B, D) -> (B, D) unit rows.

    ``hidden=0`` makes the branch linear: ``normalise(x + W drop(x))``. The last
    layer of the branch is zero-initialised (identity map at the start).
    """

    def __init__(self, dim: int, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__()
        self.drop_in = nn.Dropout(dropout)
        if hidden:
            self.branch = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        else:
            self.branch = nn.Sequential(nn.Linear(dim, dim))
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.branch(self.drop_in(x)), dim=-1)


class SimCSEPPAdapter:
    """Scikit-learn-style SimCSE++ adaptation of embeddings (``fit(X)``, ``transform(X)``).

    Parameters
    ----------
    hidden : int
        Width of the projection's hidden layer (0: a linear residual branch).
    dropout : float
        Dropout of the branch (the source of the two positive views).
    epochs, batch_size, lr, weight_decay : training schedule (AdamW, shuffled batches; a last
        batch of one row is dropped, DCL needs two).
    tau, pos_ratio, dcl_weight, dcl_tau : the :class:`SimCSEPPLoss` parameters.
    off_dropout_negatives : bool
        Negatives from the dropout-off pass (SimCSE++); False gives SimCSE's in-batch negatives.
    seed : int
        Initialisation and batch order.

    Attributes
    ----------
    model_ : ResidualProjection
    history_ : list of dict, per epoch ``loss``, ``instance``, ``dcl`` (means over batches)
    n_features_in_ : int
    seconds_ : float, training time
    """

    def __init__(self, hidden: int = 512, dropout: float = 0.1, epochs: int = 5, batch_size: int = 256,
                 lr: float = 1e-4, weight_decay: float = 0.0, tau: float = 0.05, pos_ratio: float = 1.0,
                 dcl_weight: float = 0.1, dcl_tau: float = 5.0, off_dropout_negatives: bool = True,
                 seed: int = 0) -> None:
        self.hidden, self.dropout, self.epochs, self.batch_size = hidden, dropout, epochs, batch_size
        self.lr, self.weight_decay, self.tau, self.pos_ratio = lr, weight_decay, tau, pos_ratio
        self.dcl_weight, self.dcl_tau, self.off_dropout_negatives, self.seed = (dcl_weight, dcl_tau,
                                                                                off_dropout_negatives, seed)

    def _check(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= float(self.dropout) < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if float(self.dropout) == 0:
            raise ValueError("dropout must be > 0: the two positive views come from dropout")

    def fit(self, X: np.ndarray, y=None) -> SimCSEPPAdapter:
        """Train on ``X`` (N, D) (rows L2-normalised here; labels unused); return self."""
        self._check()
        X = torch.as_tensor(np.asarray(X, np.float32))
        if X.ndim != 2 or len(X) < 2:
            raise ValueError(f"X must be (N, D) with N >= 2, got shape {tuple(X.shape)}")
        X = F.normalize(X, dim=-1)
        t0 = time.perf_counter()
        torch.manual_seed(int(self.seed))
        gen = torch.Generator().manual_seed(int(self.seed))
        self.n_features_in_ = X.shape[1]
        self.model_ = model = ResidualProjection(X.shape[1], int(self.hidden), float(self.dropout))
        loss_fn = SimCSEPPLoss(tau=float(self.tau), pos_ratio=float(self.pos_ratio),
                               dcl_weight=float(self.dcl_weight), dcl_tau=float(self.dcl_tau))
        opt = torch.optim.AdamW(model.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        bs = min(int(self.batch_size), len(X))
        self.history_ = []
        model.train()
        for epoch in range(int(self.epochs)):
            perm = torch.randperm(len(X), generator=gen)
            sums = np.zeros(3)
            n_batches = 0
            for s in range(0, len(X), bs):
                idx = perm[s:s + bs]
                if len(idx) < 2:
                    continue
                xb = X[idx]
                z1, z2 = model(xb), model(xb)
                z_neg = off_dropout_forward(model, xb) if self.off_dropout_negatives else None
                loss, terms = loss_fn(z1, z2, z_neg, return_terms=True)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += [loss.item(), terms["instance"].item(), terms["dcl"].item()]
                n_batches += 1
            mean = sums / max(n_batches, 1)
            self.history_.append({"epoch": epoch, "loss": float(mean[0]), "instance": float(mean[1]),
                                  "dcl": float(mean[2])})
        self.seconds_ = time.perf_counter() - t0
        log.info("adapt: SimCSE++ projection on %d rows, %d epochs, loss %.4f -> %.4f, %.1f s", len(X),
                 int(self.epochs), self.history_[0]["loss"], self.history_[-1]["loss"], self.seconds_)
        return self

    @torch.no_grad()
    def transform(self, X: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """The adapted rows (N, D) float32, unit norm (dropout off)."""
        if not hasattr(self, "model_"):
            raise RuntimeError("SimCSEPPAdapter: call fit before transform")
        X = np.asarray(X, np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be (N, {self.n_features_in_}), got shape {X.shape}")
        self.model_.eval()
        out = np.empty_like(X)
        for s in range(0, len(X), batch_size):
            xb = F.normalize(torch.from_numpy(X[s:s + batch_size]), dim=-1)
            out[s:s + batch_size] = self.model_(xb).numpy()
        return out

    def fit_transform(self, X: np.ndarray, y=None) -> np.ndarray:
        return self.fit(X).transform(X)
