"""Fine-tuning the open_clip image tower: tower splitting, freezing, the net (data: :mod:`.views`).

The image tower (``backbone.model.visual``) is seen as ``stem -> blocks[0..n-1] -> tail``:

* timm EfficientNet-style trunks (``effnet-lite0``): stem = ``conv_stem, bn1``, blocks =
  ``trunk.blocks`` (the 7 stages), tail = ``conv_head, bn2``, pooling and open_clip's head;
* open_clip ``VisionTransformer`` (``tiny-clip``, ViT-B-32): stem = patch embedding, class and
  position embeddings and ``ln_pre``, blocks = ``transformer.resblocks``, tail = pooling,
  ``ln_post`` and ``proj``.

``retrain.tower.train`` picks what is trained: ``frozen`` (head only), ``partial`` (the last
``unfreeze_last`` blocks, the tail and the head) or ``full``. Frozen modules stay in eval mode
(BatchNorm statistics fixed), so the frozen prefix ``stem + blocks[:k]`` is a fixed function of
its input: with ``retrain.tower.cache_views = V > 0`` it is computed once per image for the clean
view and ``V`` seeded augmented views (a "view bank", kept in the artifact cache) and training
runs only the trainable suffix on those tensors. On two CPU cores this is what makes training
the backbone on images affordable.

Determinism: every augmentation draws from a seed that is a function of (run seed, row, view)
or (run seed, step, slot), never of worker or process state, and the data order of step ``t``
is a function of ``t``; a run resumed from a mid-run checkpoint therefore replays the remaining
steps exactly (see :class:`StepBatchSampler`).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from ssl_pipeline.errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_MODES = ("frozen", "partial", "full")


from ssl_pipeline.models.views import (  # noqa: E402,F401 - the data side, imported from here too
    SUP,
    UNL_STRONG,
    UNL_WEAK,
    BankItems,
    InterruptAtStep,
    RowImages,
    SimulatedInterrupt,
    StepBatchSampler,
    StepLoader,
    TrainItems,
    TrainSet,
    ViewBank,
    collate_train,
    make_transforms,
    mix_seed,
    seeded,
    view_seed,
)


class TowerParts:
    """``stem -> blocks -> tail`` view of an open_clip image tower (no parameters of its own).

    ``part_of(name)`` maps a parameter or module name of the tower to ``"stem"``, a block index
    or ``"tail"``.
    """

    n_blocks: int

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def part_of(self, name: str) -> str | int:
        raise NotImplementedError


class _TimmBlocksParts(TowerParts):
    """open_clip ``TimmModel`` around a timm trunk with ``conv_stem, bn1, blocks, conv_head, bn2``."""

    _block = re.compile(r"^trunk\.blocks\.(\d+)(\.|$)")

    def __init__(self, visual: nn.Module):
        self.v = visual
        self.t = visual.trunk
        self.n_blocks = len(self.t.blocks)

    def stem(self, x):
        return self.t.bn1(self.t.conv_stem(x))

    def block(self, i, x):
        return self.t.blocks[i](x)

    def tail(self, x):
        x = self.t.bn2(self.t.conv_head(x))
        return self.v.head(self.t.forward_head(x))

    def part_of(self, name):
        if name.startswith(("trunk.conv_stem", "trunk.bn1")):
            return "stem"
        m = self._block.match(name)
        return int(m.group(1)) if m else "tail"


class _OpenClipViTParts(TowerParts):
    """open_clip ``VisionTransformer``; tokens are kept in the transformer's own layout."""

    _block = re.compile(r"^transformer\.resblocks\.(\d+)(\.|$)")
    _stem = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "patch_dropout")

    def __init__(self, visual: nn.Module):
        self.v = visual
        self.n_blocks = len(visual.transformer.resblocks)
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    def stem(self, x):
        x = self.v._embeds(x)
        return x if self.batch_first else x.transpose(0, 1).contiguous()

    def block(self, i, x):
        return self.v.transformer.resblocks[i](x)

    def tail(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        pooled, _ = self.v._pool(x)
        return pooled @ self.v.proj if self.v.proj is not None else pooled

    def part_of(self, name):
        if name.split(".")[0] in self._stem:
            return "stem"
        m = self._block.match(name)
        return int(m.group(1)) if m else "tail"


def tower_parts(visual: nn.Module) -> TowerParts | None:
    """The split of ``visual`` into stem/blocks/tail, checked against its own forward; None if unknown."""
    t = getattr(visual, "trunk", None)
    if t is not None and all(hasattr(t, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2",
                                                     "forward_head")):
        parts: TowerParts = _TimmBlocksParts(visual)
    elif all(hasattr(visual, a) for a in ("_embeds", "_pool", "transformer", "proj")) \
            and not getattr(visual, "output_tokens", False):
        parts = _OpenClipViTParts(visual)
    else:
        return None
    # the split must reproduce the tower exactly (eval mode, one small input)
    size = getattr(visual, "image_size", None)
    size = int(size[0] if isinstance(size, (tuple, list)) else size or 224)
    was_training = visual.training
    visual.eval()
    try:
        with torch.no_grad():
            x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
            h = parts.stem(x)
            for i in range(parts.n_blocks):
                h = parts.block(i, h)
            ok = torch.allclose(parts.tail(h), visual(x), atol=1e-4, rtol=1e-4)
    finally:
        visual.train(was_training)
    if not ok:
        log.warning("the stem/blocks/tail split of %s does not reproduce its forward; partial freezing and "
                    "view caching are disabled for it", type(visual).__name__)
        return None
    return parts


# ---------------------------------------------------------------------------------------------
# the network: tower + head
# ---------------------------------------------------------------------------------------------


class FinetuneNet(nn.Module):
    """Image tower + classification head on its L2-normalised features.

    Parameters
    ----------
    visual : the open_clip image tower (``backbone.model.visual``), trained in place
    n_classes, embed_dim : int
    head : ``linear`` | ``mlp`` | ``cosine``
    train_mode : ``frozen`` | ``partial`` | ``full``
    unfreeze_last : int, blocks trained in ``partial`` mode (the tail is trained too)

    ``frozen_blocks`` (k) is the number of leading blocks that never change: the frozen prefix
    is ``stem + blocks[:k]`` (k = n_blocks and a frozen tail in ``frozen`` mode).
    """

    def __init__(self, visual: nn.Module, n_classes: int, embed_dim: int, head: str = "linear", hidden: int = 512,
                 dropout: float = 0.0, train_mode: str = "partial", unfreeze_last: int = 2):
        super().__init__()
        from ssl_pipeline.models.heads import make_head

        if train_mode not in TRAIN_MODES:
            raise ConfigError("retrain.tower.train", f"must be one of {', '.join(TRAIN_MODES)}, got {train_mode!r}")
        self.visual = visual
        self.parts = tower_parts(visual)
        self.train_mode = train_mode
        n = self.parts.n_blocks if self.parts else 0
        if train_mode == "partial":
            if self.parts is None:
                raise ConfigError("retrain.tower.train", f"partial unfreezing is not supported for the image tower "
                                                         f"{type(visual).__name__}; use frozen or full")
            if not 0 <= int(unfreeze_last) <= n:
                raise ConfigError("retrain.tower.unfreeze_last", f"must be in [0, {n}] for this tower, "
                                                                 f"got {unfreeze_last}")
            self.frozen_blocks = n - int(unfreeze_last)
        else:
            self.frozen_blocks = n if train_mode == "frozen" else 0
        self.head = make_head(head, embed_dim, n_classes, hidden, dropout)
        self._frozen_modules: list[nn.Module] = []
        for name, p in self.visual.named_parameters():
            p.requires_grad_(self._trainable(name))
        for name, m in self.visual.named_modules():
            own = list(m.parameters(recurse=False))
            is_unit = own or list(m.buffers(recurse=False)) or not any(True for _ in m.children())
            if not name or not is_unit:
                continue
            # a module with its own weights (a BatchNorm with an activation inside, say) follows them;
            # parameter-free leaves (activations, pooling, dropout) follow their name
            if not (any(p.requires_grad for p in own) if own else self._trainable(name)):
                self._frozen_modules.append(m)
        self.train(self.training)

    # -- which part trains ------------------------------------------------------------------
    def _trainable(self, name: str) -> bool:
        if self.train_mode == "full":
            return True
        if self.train_mode == "frozen":
            return False
        part = self.parts.part_of(name)
        return part == "tail" or (isinstance(part, int) and part >= self.frozen_blocks)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen_modules:  # frozen BatchNorm keeps its statistics, frozen dropout is off
            m.eval()
        return self

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @property
    def can_cache(self) -> bool:
        """Whether a frozen prefix exists that can be precomputed per view."""
        return self.train_mode == "frozen" or (self.train_mode == "partial" and self.frozen_blocks > 0)

    # -- forward --------------------------------------------------------------------------------
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) -> the frozen prefix output (the input of :meth:`features`)."""
        if self.parts is None:  # frozen tower without a known split: the whole tower is the prefix
            return self.visual(x)
        h = self.parts.stem(x)
        for i in range(self.frozen_blocks):
            h = self.parts.block(i, h)
        if self.train_mode == "frozen":
            h = self.parts.tail(h)
        return h

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """Frozen-prefix output -> (B, D) tower features (not normalised)."""
        if self.train_mode == "frozen":
            return h
        for i in range(self.frozen_blocks, self.parts.n_blocks):
            h = self.parts.block(i, h)
        return self.parts.tail(h)

    def embed(self, x: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """(B, D) L2-normalised features from images, or from prefix outputs when ``cached``."""
        if cached:
            f = self.features(x.float())
        elif self.train_mode == "full" or self.parts is None:
            f = self.visual(x)
        else:
            f = self.features(self.prefix(x))
        return nn.functional.normalize(f.float(), dim=-1)

    def forward(self, x: torch.Tensor, cached: bool = False) -> torch.Tensor:
        return self.head(self.embed(x, cached))

    # -- optimisation ---------------------------------------------------------------------------
    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float, layer_decay: float = 1.0) -> list:
        """AdamW parameter groups: the head at ``lr``; the tower at ``backbone_lr`` with layer-wise decay.

        Block ``i`` of ``n`` gets ``backbone_lr * layer_decay ** (n - i)``, the stem
        ``backbone_lr * layer_decay ** (n + 1)``, the tail ``backbone_lr``. Biases and norm
        weights (1-d tensors) get no weight decay.
        """
        groups: dict[tuple[float, float], list] = {}

        def add(p, scale_lr):
            if not p.requires_grad:
                return
            wd = 0.0 if p.ndim <= 1 else weight_decay
            groups.setdefault((scale_lr, wd), []).append(p)

        n = self.parts.n_blocks if self.parts else 0
        for name, p in self.visual.named_parameters():
            part = self.parts.part_of(name) if self.parts else "tail"
            depth = 0 if part == "tail" else (n + 1 if part == "stem" else n - int(part))
            add(p, backbone_lr * layer_decay ** depth)
        for p in self.head.parameters():
            add(p, lr)
        return [{"params": ps, "lr": glr, "initial_lr": glr, "weight_decay": wd} for (glr, wd), ps in groups.items()]


def init_head_from_prototypes(net: FinetuneNet, feats: torch.Tensor, labels: torch.Tensor) -> None:
    """Set a linear/cosine head to the class means of (normalised) ``feats`` of the labeled rows.

    Starting from the nearest-class-mean classifier makes the first steps useful with few labels.
    """
    from ssl_pipeline.models.heads import CosineHead

    head = net.head
    lin = head if not isinstance(head, nn.Sequential) else [m for m in head if isinstance(m, (nn.Linear, CosineHead))]
    if isinstance(lin, list):
        if len(lin) != 1:
            return  # mlp: keep the random init
        lin = lin[0]
    C = int(getattr(lin, "out_features", 0) or lin.weight.shape[0])
    P = torch.zeros(C, feats.shape[1])
    for c in range(C):
        m = labels == c
        if m.any():
            P[c] = nn.functional.normalize(feats[m].mean(0), dim=0)
    with torch.no_grad():
        if isinstance(lin, nn.Linear):
            lin.weight.copy_(P * 10.0)  # logit scale 10 on unit vectors
            if lin.bias is not None:
                lin.bias.zero_()
        else:
            lin.weight.copy_(P)


# ---------------------------------------------------------------------------------------------
# augmentation
# ---------------------------------------------------------------------------------------------


