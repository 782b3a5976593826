"""The multi-label labeler of the pseudolabel stage: CSA head + class-aware pseudo-labels (``_target_`` in
conf/multilabel/default.yaml), and the labeled-set redraw for unreadable images.

:class:`CSALabeler` is a scikit-learn-style estimator: ``fit(tokens, Y, labeled, neighbors)``
trains the context-aware semantic-alignment head (:mod:`.head`) on the labeled
rows with pseudo-labels of the unlabeled rows refreshed by its EMA teacher
(:mod:`.train`, :mod:`.pseudo`), then sets the final pseudo-labels.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray

from ssl_pipeline.artifacts import atomic_save_npy
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import DataError
from ssl_pipeline.labeling.knn import KNNGraph
from ssl_pipeline.multilabel.contexts import context_targets, spectral_contexts
from ssl_pipeline.multilabel.head import AlignmentHead, init_class_embeddings
from ssl_pipeline.multilabel.pseudo import knn_vote, make_pseudolabels
from ssl_pipeline.multilabel.settings import DEFAULTS, project_tokens, token_pca
from ssl_pipeline.multilabel.thresholds import class_frequencies
from ssl_pipeline.multilabel.train import fit, predict

log = logging.getLogger(__name__)


def redraw_labeled(table: SampleTable, available: NDArray[np.bool_], seed: int) -> None:
    """Redraw ``table.labeled`` among readable images when a labeled image is unreadable or a label lost its
    labeled positives; DataError when a label has no readable labeled positive at all."""
    from ssl_pipeline.data.multilabel import draw_labeled_fraction

    Y = np.asarray(table.y_true)
    labeled = table.labeled & available
    lost = (~available & table.labeled).any()
    if lost or (Y[labeled].sum(0) == 0).any():
        frac = float(table.meta.get("labeled_fraction", max(labeled.mean(), 1e-3)))
        labeled = draw_labeled_fraction(Y, table.train & available, frac, seed)
        log.warning("multilabel: %d labeled images were unreadable; labeled set redrawn among readable ones",
                    int((~available & table.labeled).sum()))
    missing = [table.classes[c] for c in range(Y.shape[1]) if Y[labeled, c].sum() == 0]
    if missing:
        raise DataError(f"labels {missing} have no readable labeled positive image; raise data.labeled_fraction")
    table.labeled = labeled


def graph_neighbours(graph: KNNGraph, k: int) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """The first ``k`` neighbours of each row of a cluster-stage graph: (sims (n, k'), idx (n, k')).

    Missing neighbours (``idx < 0``) point at the row itself with weight 0.
    """
    k = min(int(k), graph.idx.shape[1])
    idx = np.asarray(graph.idx[:, :k], np.int64).copy()
    sims = np.asarray(graph.sim[:, :k], np.float32).copy()
    bad = idx < 0
    idx[bad] = np.nonzero(bad)[0]
    sims[bad] = 0.0
    return sims, idx


class CSALabeler:
    """Multi-label pseudo-labels from the context-aware semantic-alignment head (CSA + CAP).

    Parameters
    ----------
    settings : dict
        The multi-label settings (:data:`ssl_pipeline.multilabel.settings.DEFAULTS` keys).
    seed : int

    Attributes (after :meth:`fit`, over the n rows given)
    ----------
    scores_ : (n, C) float32
        Smoothed teacher scores (labeled rows: their given labels).
    decision_, counted_, vetoed_ : (n, C) bool
        Final pseudo-labels, entries outside the masked band, context vetoes (unlabeled rows; labeled: given / True /
        False).
    teacher_scores_ : (n, C) float32
        Raw teacher scores of every row.
    tau_, pi_ : (C,) thresholds and smoothed labeled class frequencies
    context_of_ : (C,) int64, contexts_ : dict (eigenvalues, affinity), history_ : list
    head_ : AlignmentHead (the EMA teacher), class_embed_ : (C, d') float32, pca_ : (mean, W) or None
    """

    def __init__(self, settings: dict | None = None, seed: int = 0):
        self.settings = dict(DEFAULTS if settings is None else settings)
        self.seed = int(seed)

    def new_head(self) -> AlignmentHead:
        s = self.settings
        torch.manual_seed(self.seed)
        return AlignmentHead(self.dim_, self.class_embed_, self.context_of_, hidden=int(s["hidden"]),
                             dropout=float(s["dropout"]), global_branch=bool(s["global_branch"]))

    def transform(self, tokens: NDArray) -> torch.Tensor:
        """(m, P, d) float16 encode tokens -> the head's input (m, P, d') (the fitted PCA, when any)."""
        return torch.from_numpy(project_tokens(tokens, *self.pca_) if self.pca_ is not None else tokens)

    def fit(self, tokens: NDArray, Y: NDArray, labeled: NDArray[np.bool_], neighbors: KNNGraph | None = None,
            text: NDArray | None = None) -> CSALabeler:
        """Fit on ``tokens`` (n, P, d) float16 with labels ``Y`` (n, C) 0/1 seen on ``labeled`` (n,) rows.

        ``neighbors``: the kNN graph over the same n rows (positions into them), or None (no smoothing).
        ``text``: (C, d) class-name text embeddings in the token space, or None.
        """
        s, seed = self.settings, self.seed
        lab, unl = np.flatnonzero(labeled), np.flatnonzero(~labeled)
        use_text = text is not None and bool(s["text_embeddings"])
        self.pca_ = None
        if s["token_dim"] and int(s["token_dim"]) < tokens.shape[-1] and not use_text:
            # one token per image (pooled embeddings): fit on up to 20,000 images, not 200 (a D-dim covariance)
            self.pca_ = token_pca(tokens, np.r_[lab, unl], int(s["token_dim"]), seed,
                                  max_images=20000 if tokens.shape[1] == 1 else 200)
        tok = self.transform(tokens)
        self.dim_ = int(tok.shape[-1])
        tok_lab, tok_unl = tok[lab], tok[unl]
        Y_lab = np.asarray(Y)[lab].astype(np.int8)
        cs, ps = s["contexts"], s["pseudo"]
        self.context_of_, cinfo = spectral_contexts(Y_lab, cs["n_contexts"], int(cs["min_contexts"]),
                                                    cs["max_contexts"], seed)
        self.contexts_ = cinfo
        ctx_lab = context_targets(Y_lab, self.context_of_)
        self.pi_ = pi = class_frequencies(Y_lab, float(ps["prior_strength"]))
        pi_ctx = class_frequencies(ctx_lab, float(ps["prior_strength"]))
        self.class_embed_ = np.asarray(text if use_text else init_class_embeddings(tok_lab.float().numpy(), Y_lab),
                                       np.float32)
        n_l, k, alpha = len(lab), int(ps["knn_k"]), float(ps["knn_alpha"])
        sims = idx = None
        if alpha > 0 and k > 0 and len(unl) and neighbors is not None:
            # the cluster stage's graph, re-indexed into the [labeled, unlabeled] order of the vote's targets
            order = np.r_[lab, unl]
            where = np.empty(len(order), np.int64)
            where[order] = np.arange(len(order))
            g_sims, g_idx = graph_neighbours(neighbors, k)
            sims, idx = g_sims[order], where[g_idx[order]]

        def refresh(teacher: AlignmentHead):
            p, pc = predict(teacher, tok_unl)
            if sims is not None:
                vote = knn_vote(np.concatenate([Y_lab.astype(np.float32), p]), sims, idx,
                                float(ps["knn_power"]))[n_l:]
                p = (1.0 - alpha) * p + alpha * vote
            return make_pseudolabels(p, pi, float(ps["band"]), self.context_of_, pc, pi_ctx,
                                     bool(ps["context_veto"]))

        log.info("multilabel: %d labeled, %d unlabeled images; %d labels in %d contexts", n_l, len(unl),
                 Y_lab.shape[1], cinfo["n_contexts"])
        semi = fit(self.new_head(), tok_lab, torch.from_numpy(Y_lab.astype(np.float32)), torch.from_numpy(ctx_lab),
                   tok_unl, refresh if len(unl) else None, s, seed)
        self.head_, self.history_ = semi.teacher, semi.history
        n, C = len(labeled), Y_lab.shape[1]
        self.scores_ = np.zeros((n, C), np.float32)
        self.decision_ = np.zeros((n, C), bool)
        self.counted_ = np.ones((n, C), bool)
        self.vetoed_ = np.zeros((n, C), bool)
        self.scores_[lab] = Y_lab
        self.decision_[lab] = Y_lab == 1
        self.tau_ = np.full(C, np.nan)
        self.teacher_scores_ = predict(self.head_, tok)[0].astype(np.float32)
        if len(unl):
            final = refresh(self.head_)
            self.scores_[unl], self.decision_[unl] = final.scores, final.decision
            self.counted_[unl], self.vetoed_[unl], self.tau_ = final.counted, final.vetoed, final.tau
        return self

    def save(self, folder: Path) -> None:
        """The fitted head and what rebuilds it: ``head.pt``, ``class_embed.npy``, ``context_of.npy``, the PCA."""
        folder = Path(folder)
        torch.save(self.head_.state_dict(), folder / "head.pt")
        arrays = {"class_embed": self.class_embed_, "context_of": self.context_of_, "head_dim": np.array(self.dim_)}
        if self.pca_ is not None:
            arrays.update(token_pca_mean=self.pca_[0], token_pca_W=self.pca_[1])
        for name, a in arrays.items():
            atomic_save_npy(folder / f"{name}.npy", np.asarray(a))

    @classmethod
    def load(cls, folder: Path, settings: dict, seed: int) -> CSALabeler:
        """A labeler whose ``head_`` (and PCA) are read back from a :meth:`save` folder."""
        folder = Path(folder)
        self = cls(settings, seed)
        self.class_embed_ = np.load(folder / "class_embed.npy")
        self.context_of_ = np.load(folder / "context_of.npy")
        self.pca_ = ((np.load(folder / "token_pca_mean.npy"), np.load(folder / "token_pca_W.npy"))
                     if (folder / "token_pca_W.npy").exists() else None)
        self.dim_ = int(np.load(folder / "head_dim.npy"))
        self.head_ = self.new_head()
        self.head_.load_state_dict(torch.load(folder / "head.pt", weights_only=True))
        self.head_.eval()
        return self
