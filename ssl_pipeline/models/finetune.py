"""Fine-tuning the open_clip image tower on images: tower splitting, freezing, augmentation, data order.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import nn

from ssl_pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TRAIN_MODES = ("frozen", "partial", "full")
# kinds of sample in a training batch
SUP, UNL_WEAK, UNL_STRONG = 0, 1, 2


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing integer ``parts`` (numpy SeedSequence; independent of Python's hash salt)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# tower splitting
# ---------------------------------------------------------------------------------------------


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
    head = net.head
    lin = head if not isinstance(head, nn.Sequential) else [m for m in head if isinstance(m, nn.Linear)]
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


def _normalize_of(preprocess) -> tuple[Sequence[float], Sequence[float]]:
    from torchvision import transforms as T

    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Normalize):
            return t.mean, t.std
    return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def make_transforms(preprocess, image_size: int, strong_ops: int = 2, strong_magnitude: int = 10) -> dict:
    """``{"clean", "weak", "strong"}``: PIL image -> (3, S, S) float tensor.

    clean: the backbone's eval transform (what encode used). weak: resize, centre crop,
    horizontal flip and a random translation of up to 1/8 of the side (reflect-padded crop).
    strong: weak + RandAugment(``strong_ops``, ``strong_magnitude``) + one erased rectangle.
    """
    from torchvision import transforms as T

    mean, std = _normalize_of(preprocess)
    S = int(image_size)
    base = [T.Resize(S, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(S), T.RandomHorizontalFlip(),
            T.RandomCrop(S, padding=max(1, S // 8), padding_mode="reflect")]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    weak = T.Compose(base + tail)
    strong = T.Compose(base + [T.RandAugment(num_ops=strong_ops, magnitude=strong_magnitude)] + tail
                       + [T.RandomErasing(p=1.0, scale=(0.02, 0.2), value=0)])
    return {"clean": preprocess, "weak": weak, "strong": strong}


def seeded(transform: Callable, img, seed: int) -> torch.Tensor:
    """``transform(img)`` with torch's global RNG seeded by ``seed`` (and restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(img)


class RowImages:
    """Decoded RGB images of table rows; keeps up to ``preload_max`` of them in memory (resized)."""

    def __init__(self, table, image_size: int, preload_max: int = 10000):
        from ssl_pipeline.data.images import TableImages

        self.reader = TableImages(table, np.zeros(0, np.int64), None)
        self.size = int(image_size)
        self.preload_max = int(preload_max)
        self._mem: dict[int, object] = {}

    def get(self, row: int):
        row = int(row)
        img = self._mem.get(row)
        if img is None:
            try:
                img = self.reader.load(row)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"retrain: cannot read image of row {row} "
                                f"({self.reader.table.paths[row] or self.reader.table.ids[row]}): {e}") from e
            w, h = img.size
            if min(w, h) > 2 * self.size:  # keep memory bounded, aspect kept (the transforms resize anyway)
                s = 2 * self.size / min(w, h)
                img = img.resize((max(1, round(w * s)), max(1, round(h * s))))
            if len(self._mem) < self.preload_max:
                self._mem[row] = img
        return img


# ---------------------------------------------------------------------------------------------
# the view bank: frozen-prefix outputs of seeded views
# ---------------------------------------------------------------------------------------------


@dataclass
class ViewBank:
    """Frozen-prefix outputs per row: ``clean`` (M, *F) and ``weak``/``strong`` (M, V, *F), float16.

    ``pos`` maps a table row to its index in these arrays.
    """

    rows: np.ndarray
    clean: torch.Tensor
    weak: torch.Tensor | None
    strong: torch.Tensor | None

    def __post_init__(self):
        self.pos = {int(r): i for i, r in enumerate(self.rows)}

    @property
    def n_views(self) -> int:
        return 0 if self.weak is None else int(self.weak.shape[1])


def view_seed(seed: int, kind: int, row: int, view: int) -> int:
    """Seed of augmented view ``view`` of ``kind`` (1 weak, 2 strong) of table row ``row``."""
    return mix_seed(seed, 7, kind, row, view)


class BankItems(torch.utils.data.Dataset):
    """Items for building a view bank: ``(index, images (n_views_of_row, 3, S, S))`` per row."""

    def __init__(self, images: RowImages, rows: np.ndarray, n_weak: np.ndarray, n_strong: np.ndarray,
                 transforms: dict, seed: int):
        self.images, self.rows, self.n_weak, self.n_strong = images, rows, n_weak, n_strong
        self.tf, self.seed = transforms, seed

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        img = self.images.get(row)
        views = [self.tf["clean"](img)]
        views += [seeded(self.tf["weak"], img, view_seed(self.seed, 1, row, v)) for v in range(int(self.n_weak[i]))]
        views += [seeded(self.tf["strong"], img, view_seed(self.seed, 2, row, v))
                  for v in range(int(self.n_strong[i]))]
        return i, torch.stack(views)


# ---------------------------------------------------------------------------------------------
# training data: deterministic step-indexed batches
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainSet:
    """What one model trains on (positions index these arrays).

    rows, labels, weights : (n,) table rows, labels, per-sample weights of the supervised set
    is_pseudo : (n,) bool, pseudo-labeled (else a given label)
    unl_rows : (u,) table rows for the consistency loss (empty: no consistency term)
    targets : (n, C) float soft targets (rows sum to 1), or None for hard labels
    """

    rows: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    is_pseudo: np.ndarray
    unl_rows: np.ndarray
    targets: np.ndarray | None = None


class _Stream:
    """An endless, seeded sequence over ``n`` items: permutation of epoch 0, then epoch 1, ..."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = int(n), seed
        self._cache: dict[int, np.ndarray] = {}

    def take(self, start: int, count: int) -> np.ndarray:
        if self.n == 0 or count == 0:
            return np.zeros(0, np.int64)
        out = np.empty(count, np.int64)
        for j in range(count):
            e, i = divmod(start + j, self.n)
            perm = self._cache.get(e)
            if perm is None:
                if len(self._cache) > 4:
                    self._cache.clear()
                perm = self._cache[e] = np.random.default_rng(mix_seed(self.seed, e)).permutation(self.n)
            out[j] = perm[i]
        return out


class StepBatchSampler(torch.utils.data.Sampler):
    """Batch keys for optimizer steps ``start .. steps-1``; step ``t``'s batch depends on ``t`` only.

    Each rank's batch per step: ``n_lab`` given-label samples, ``n_pseudo`` pseudo-labeled ones
    and ``n_unl`` unlabeled ones (each as a weak and a strong view), drawn from three seeded
    epoch-permutation streams. Rank ``r`` of ``W`` takes slice ``r`` of the step's global draw,
    so W processes see the same global batch as one process with W times the per-rank batch.
    Keys are ``(kind, position, view seed)``.
    """

    def __init__(self, ts: TrainSet, steps: int, n_lab: int, n_pseudo: int, n_unl: int, seed: int,
                 start: int = 0, rank: int = 0, world: int = 1):
        self.lab = np.flatnonzero(~ts.is_pseudo)
        self.pse = np.flatnonzero(ts.is_pseudo)
        self.n_unl_items = len(ts.unl_rows)
        if len(self.pse) == 0:  # labeled-only training: the whole batch from the labeled stream
            n_lab, n_pseudo = n_lab + n_pseudo, 0
        if len(self.lab) == 0:
            n_lab, n_pseudo = 0, n_lab + n_pseudo
        if self.n_unl_items == 0:
            n_unl = 0
        self.sizes = (n_lab, n_pseudo, n_unl)
        self.steps, self.seed, self.start, self.rank, self.world = int(steps), seed, int(start), rank, world
        self.streams = [_Stream(len(self.lab), mix_seed(seed, 1)), _Stream(len(self.pse), mix_seed(seed, 2)),
                        _Stream(self.n_unl_items, mix_seed(seed, 3))]

    def __len__(self) -> int:
        return self.steps  # the whole run is one "epoch" of `steps` batches (resumes mid-way)

    def batch(self, t: int) -> list[tuple[int, int, int]]:
        keys = []
        for s, (stream, per_rank) in enumerate(zip(self.streams, self.sizes)):
            if per_rank == 0:
                continue
            lo = self.rank * per_rank
            idx = stream.take(t * per_rank * self.world + lo, per_rank)
            # augmentation seeds of the step's global slots (the same slot gets the same seed at any world size)
            G = per_rank * self.world
            seeds = np.random.default_rng(mix_seed(self.seed, 11, t, s)).integers(0, 2 ** 62, 2 * G)
            sd = [int(v) for v in seeds[lo:lo + per_rank]]
            if s == 0:
                keys += [(SUP, int(self.lab[i]), sd[j]) for j, i in enumerate(idx)]
            elif s == 1:
                keys += [(SUP, int(self.pse[i]), sd[j]) for j, i in enumerate(idx)]
            else:
                strong = [int(v) for v in seeds[G + lo:G + lo + per_rank]]
                keys += [(UNL_WEAK, int(i), sd[j]) for j, i in enumerate(idx)]
                keys += [(UNL_STRONG, int(i), strong[j]) for j, i in enumerate(idx)]
        return keys

    def __iter__(self):
        for t in range(self.start, self.steps):
            yield self.batch(t)


class TrainItems(torch.utils.data.Dataset):
    """Maps a key ``(kind, position, seed)`` to ``(input, label, weight, kind)``.

    With a :class:`ViewBank` the input is a cached prefix output (one of the row's V views,
    picked by the seed); otherwise the image is augmented on the fly with that seed.
    """

    def __init__(self, ts: TrainSet, bank: ViewBank | None, images: RowImages | None, transforms: dict | None):
        self.ts, self.bank, self.images, self.tf = ts, bank, images, transforms

    def __len__(self):
        return len(self.ts.rows)

    def _input(self, row: int, kind: str, seed: int) -> torch.Tensor:
        if self.bank is not None:
            arr = self.bank.weak if kind == "weak" else self.bank.strong
            return arr[self.bank.pos[row], seed % arr.shape[1]]
        return seeded(self.tf[kind], self.images.get(row), seed)

    def __getitem__(self, key):
        kind, p, seed = key
        q = self.ts.targets
        if kind == SUP:
            row = int(self.ts.rows[p])
            return self._input(row, "weak", seed), int(self.ts.labels[p]), float(self.ts.weights[p]), \
                int(self.ts.is_pseudo[p]) + 10 * SUP, (torch.from_numpy(q[p]) if q is not None else None)
        row = int(self.ts.unl_rows[p])
        # weak and strong view of the same unlabeled image share the slot's position, not its seed
        return self._input(row, "weak" if kind == UNL_WEAK else "strong", seed), -1, 0.0, 10 * kind, None


def collate_train(batch):
    x = torch.stack([b[0] for b in batch])
    y = torch.tensor([b[1] for b in batch], dtype=torch.long)
    w = torch.tensor([b[2] for b in batch], dtype=torch.float32)
    kind = torch.tensor([b[3] for b in batch], dtype=torch.long)
    soft = [b[4] for b in batch]
    if all(q is None for q in soft):
        return x, y, w, kind
    C = next(q for q in soft if q is not None).shape[0]
    q = torch.stack([t.float() if t is not None else torch.zeros(C) for t in soft])
    return x, y, w, kind, q


class StepLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`StepBatchSampler`. It resumes by construction (the sampler starts
    at the restored global step), which ``state_dict``/``load_state_dict`` declare to Lightning."""

    def state_dict(self) -> dict:
        return {"start": self.batch_sampler.start}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# callbacks
# ---------------------------------------------------------------------------------------------


class SimulatedInterrupt(RuntimeError):
    """Raised by :class:`InterruptAtStep`."""


class InterruptAtStep(L.Callback):
    """Fault injection for resume drills: once ``step`` optimizer steps are done (in the phase ``phase``
    of the retrain stage, or any phase when None), raise :class:`SimulatedInterrupt` (``how="raise"``)
    or SIGKILL the process itself (``how="sigkill"``: no handler, no cleanup, as ``kill -9`` would).

    ``retrain.callbacks=[{_target_: ssl_pipeline.models.finetune.InterruptAtStep, step: 7}]``
    """

    def __init__(self, step: int, phase: str | None = None, how: str = "raise"):
        if how not in ("raise", "sigkill"):
            raise ConfigError("retrain.callbacks", f"InterruptAtStep: how must be raise or sigkill, got {how!r}")
        self.step, self.phase, self.how = int(step), phase, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step and (self.phase is None or getattr(pl_module, "phase", None) == self.phase):
            if self.how == "sigkill":
                import os
                import signal

                log.warning("InterruptAtStep: SIGKILL after step %d of %s", trainer.global_step, pl_module.phase)
                os.kill(os.getpid(), signal.SIGKILL)
            raise SimulatedInterrupt(f"simulated kill after step {trainer.global_step} of {pl_module.phase}")
