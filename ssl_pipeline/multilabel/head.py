"""The context-aware semantic-alignment head (CSA-style) on frozen spatial tokens.

For an image with spatial tokens ``l_p`` (p = 1..P) and class embeddings
``e_k`` (k = 1..C) in the token space, a shared map ``phi = Linear o LayerNorm``
takes both into one hidden space, and each class gathers its own
label-specific feature by attention over the tokens::

    z_p = phi(l_p),  q_k = phi(e_k)                                  (h,)
    a_{k,p} = softmax_p(<z_p, q_k> * beta)                           attention of class k
    v_k = sum_p a_{k,p} z_p                                          label-specific feature
    s_k = gamma * cos(v_k, q_k) + b_k                                score: one-to-one alignment

so every label-specific feature is aligned with its *own* class embedding
(K one-to-one alignments instead of one image vector against K classes).
With ``global_branch`` (default) a linear score on the L2-normalised mean token
``f`` is added, ``s_k += w_k . (10 f) + c_k`` (CSA fuses the global feature
with the label-specific ones): on scene-like photos the global view carries
most of the signal at few labels, on multi-object images the alignment does.
``global_mix`` optionally blends ``f`` into every ``v_k`` instead.

Class embeddings ``e_k``: the class-name text embeddings when the backbone has a
trained text tower (the tokens are then in the image-text space too), else
learnable label queries initialised from the labeled data: ``e_k`` = the mean
token of the labeled positives of k minus the mean token of all labeled images
(a data-driven "what is special about k" direction), plus the overall mean
token so that it sits among the tokens before the LayerNorm.

The context head predicts the image's label contexts (multi-hot over M) from
the mean hidden token (a global view of the scene): a second opinion, coarser
than the labels and trained with more positives per output, that shares the
map ``phi`` with the alignment.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn


def init_class_embeddings(tokens: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Data-driven label queries (C, d) from labeled tokens (n, P, d) and labels (n, C) 0/1.

    ``e_k = mean_token + (mean token of positives of k - mean token of all labeled)``; a class with no
    labeled positive gets the mean token.
    """
    img = np.asarray(tokens, np.float32).mean(1)  # (n, d) mean token per image
    mu = img.mean(0)
    Y = np.asarray(Y, np.float32)
    cnt = Y.sum(0)
    pos = (Y.T @ img) / np.maximum(cnt[:, None], 1.0)
    diff = np.where(cnt[:, None] > 0, pos - mu, 0.0)
    return (mu[None, :] + diff).astype(np.float32)


class AlignmentHead(nn.Module):
    """Label-specific attention features, each aligned with its class embedding; plus a context head.

    Parameters
    ----------
    in_dim : int
        Token dimension d.
    class_embed : (C, d) array
        Initial class embeddings (text embeddings or :func:`init_class_embeddings`).
    context_of : (C,) int array
        Context id of each label (M = max + 1 contexts).
    hidden : int
        Hidden size h of the shared map.
    learn_class_embed : bool
        Learn the class embeddings (True for label queries; text embeddings may stay fixed).
    dropout : float
        Dropout on the label-specific features.

    Shapes
    ------
    tokens : (B, P, d)
    keep : (B, P) bool, optional; False = token dropped (augmentation)
    returns : logits (B, C), context logits (B, M)
    """

    def __init__(self, in_dim: int, class_embed: np.ndarray, context_of: np.ndarray, hidden: int = 256,
                 learn_class_embed: bool = True, dropout: float = 0.1, global_mix: float = 0.0,
                 global_branch: bool = True, global_scale: float = 10.0):
        super().__init__()
        C = len(class_embed)
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, hidden)
        e = torch.tensor(np.asarray(class_embed, np.float32))  # a copy: heads built from one array stay apart
        self.class_embed = nn.Parameter(e, requires_grad=learn_class_embed)
        self.log_beta = nn.Parameter(torch.tensor(math.log(1.0 / math.sqrt(hidden))))
        self.log_gamma = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.zeros(C))
        M = int(np.max(context_of)) + 1
        self.register_buffer("context_of", torch.as_tensor(np.asarray(context_of, np.int64)))
        self.ctx = nn.Linear(hidden, M)
        self.drop = nn.Dropout(dropout)
        self.global_scale = global_scale
        self.glob = nn.Linear(in_dim, C) if global_branch else None
        if self.glob is not None:
            nn.init.zeros_(self.glob.weight)
            nn.init.zeros_(self.glob.bias)
        self.mix_logit = nn.Parameter(torch.tensor(float(np.log(global_mix / (1 - global_mix))))) \
            if 0 < global_mix < 1 else None

    @property
    def n_classes(self) -> int:
        return self.class_embed.shape[0]

    def features(self, tokens: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (label-specific features v (B, C, h), queries q (C, h), attention (B, C, P), mean z (B, h))."""
        z = self.proj(self.norm(tokens.float()))                       # (B, P, h)
        if keep is None:
            g = z.mean(1)
        else:
            w = keep.to(z.dtype)[..., None]
            g = (z * w).sum(1) / w.sum(1).clamp(min=1.0)
        q = self.proj(self.norm(self.class_embed))                      # (C, h)
        att = torch.einsum("bph,ch->bcp", z, q) * self.log_beta.exp()  # (B, C, P)
        if keep is not None:
            att = att.masked_fill(~keep[:, None, :], float("-inf"))
        att = att.softmax(-1)
        v = torch.einsum("bcp,bph->bch", att, z)                        # (B, C, h)
        if self.mix_logit is not None:
            a = torch.sigmoid(self.mix_logit)
            v = (1 - a) * v + a * g[:, None, :]
        return v, q, att, g

    def forward(self, tokens: Tensor, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if tokens.shape[1] == 1:
            # one token per image (pooled embeddings): every v_k is that token's z, so the alignment is a cosine
            # classifier, computed as one (B, h) x (h, C) product instead of a (B, C, h) tensor (in training the
            # dropout mask on z is shared by the C classes). Its cosines are centred over the classes: the part
            # of cos(z, q_k) that every class shares (z against the queries' common direction) says how typical
            # the image is, not which labels it has, and it swamped the per-label ranking of images (202-label
            # mosaics, labeled-only head: macro mAP 0.25 -> 0.48 from centring the same scores)
            z = self.proj(self.norm(tokens[:, 0].float()))              # (B, h)
            q = self.proj(self.norm(self.class_embed))                  # (C, h)
            cos = nn.functional.normalize(self.drop(z), dim=-1) @ nn.functional.normalize(q, dim=-1).T
            cos = cos - cos.mean(1, keepdim=True)
            g = z
        else:
            v, q, _, g = self.features(tokens, keep)
            v = self.drop(v)
            cos = nn.functional.cosine_similarity(v, q[None], dim=-1)  # (B, C)
        logits = self.log_gamma.exp().clamp(max=100.0) * cos + self.bias
        if self.glob is not None:
            x = tokens.float()
            if keep is None:
                m = x.mean(1)
            else:
                w = keep.to(x.dtype)[..., None]
                m = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
            logits = logits + self.glob(self.drop(nn.functional.normalize(m, dim=-1) * self.global_scale))
        ctx_logits = self.ctx(self.drop(g))                             # (B, M)
        return logits, ctx_logits
