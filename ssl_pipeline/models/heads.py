"""Classification heads on embeddings."""

from __future__ import annotations

import torch
from torch import nn


def make_head(kind: str, in_dim: int, n_classes: int, hidden: int = 512, dropout: float = 0.0) -> nn.Module:
    """A ``linear``, ``mlp`` or ``cosine`` head mapping (B, in_dim) -> (B, n_classes) logits."""
    if kind == "linear":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                             nn.Linear(hidden, n_classes))
    if kind == "cosine":
        return nn.Sequential(nn.Dropout(dropout), CosineHead(in_dim, n_classes))
    from ssl_pipeline.errors import ConfigError

    raise ConfigError("retrain.head", f"unknown head {kind!r}; valid: linear, mlp, cosine")


class CosineHead(nn.Module):
    """Scaled cosine classifier: logits = s * cos(x, w_c); (B, D) -> (B, C)."""

    def __init__(self, in_dim: int, n_classes: int, scale: float = 16.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, in_dim) * in_dim ** -0.5)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T
