"""The alignment head on one token per image (pooled embeddings): the (B, h) x (h, C) path gives the general
attention path's cosines, centred over the classes."""

from __future__ import annotations

import numpy as np
import torch

from ssl_pipeline.multilabel.head import AlignmentHead


def test_single_token_scores_are_the_attention_path_centred_over_classes():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(7, 16)).astype(np.float32)
    torch.manual_seed(0)
    head = AlignmentHead(16, e, np.array([0, 0, 1, 1, 2, 2, 2]), hidden=8, dropout=0.3).eval()
    with torch.no_grad():
        head.glob.weight.normal_()  # a non-zero global branch
    x = torch.randn(5, 1, 16)
    logits, ctx = head(x)
    v, q, _, g = head.features(x)  # the general path, written out
    cos = torch.nn.functional.cosine_similarity(v, q[None], dim=-1)
    cos = cos - cos.mean(1, keepdim=True)  # the part every class shares removed
    ref = head.log_gamma.exp() * cos + head.bias + head.glob(torch.nn.functional.normalize(x[:, 0], dim=-1) * 10.0)
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ctx, head.ctx(g), rtol=1e-5, atol=1e-5)
    # training: dropout active, still one score per class, and gradients reach the class embeddings
    head.train()
    out, _ = head(x)
    out[:, 0].sum().backward()  # (a plain sum is flat: centred cosines sum to 0 over the classes)
    assert out.shape == (5, 7) and head.class_embed.grad is not None and head.class_embed.grad.abs().sum() > 0
