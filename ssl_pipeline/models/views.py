"""Fine-tuning data: augmentations, decoded images, the view bank and the step-indexed batch order.

Determinism: every augmentation draws from a seed that is a function of (run seed, row, view)
or (run seed, step, slot), never of worker or process state, and the data order of step ``t``
is a function of ``t``; a run resumed from a mid-run checkpoint therefore replays the remaining
steps exactly (see :class:`StepBatchSampler`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from ssl_pipeline.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# kinds of sample in a training batch
SUP, UNL_WEAK, UNL_STRONG = 0, 1, 2


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixing integer ``parts`` (numpy SeedSequence; independent of Python's hash salt)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


# ---------------------------------------------------------------------------------------------
# tower splitting
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
