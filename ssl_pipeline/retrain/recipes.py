"""How much a head retrain trusts the pseudo-labels: candidate recipes, and the choice between them.

A *recipe* says which pseudo-labels a head learns from and how: ``targets`` (``hard``: the label;
``soft``: the label as a distribution times the labeled-only head's posterior), ``weight``
(``confidence``: each pseudo-label weighted by the labeler's confidence; ``one``), ``top`` (keep per
class that share of the pseudo-labels, ranked by confidence times the labeled-only head's probability
of the label), ``agree`` (keep only the pseudo-labels the labeled-only head predicts too) and
``pseudo_scale`` (a factor on every pseudo-label weight; 0 = the labeled-only head) and ``balance``
(rescale the pseudo-label weights so that each class holds the share of the pseudo-label weight that
it holds among the given labels: a labeler that piles its labels onto a few classes does not pass
that bias on to the head).

``retrain.pseudo_targets=auto`` trains every recipe of ``retrain.candidates`` on each validation
fold the pseudolabel stage wrote (``val/fold<f>/``: that fold's pseudo-labels, its held-out labeled
rows hidden from the labeler), scores it on the held-out labeled rows, and keeps the recipe with the
lowest held-out log-loss (``retrain.choose_by=logloss``; ``accuracy``: the most held-out rows right).
Only labeled training rows enter the choice; test labels never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.errors import ConfigError
from ssl_pipeline.retrain.common import filter_pseudo, select_training, soft_targets

RECIPE_KEYS = {"targets", "weight", "top", "agree", "pseudo_scale", "balance"}


@dataclass(frozen=True)
class Recipe:
    name: str
    targets: str = "hard"
    weight: str = "confidence"
    top: float = 1.0
    agree: bool = False
    pseudo_scale: float = 1.0
    balance: bool = False


def fixed_recipe(rcfg: DictConfig) -> Recipe:
    """The recipe of a run with ``retrain.pseudo_targets`` hard or soft (the other retrain keys as given)."""
    how = str(rcfg.get("pseudo_targets", "hard"))
    if how not in ("hard", "soft"):
        raise ConfigError("retrain.pseudo_targets", f"must be hard, soft or auto, got {how!r}")
    return Recipe(how, targets=how, weight=str(rcfg.get("pseudo_weight", "confidence")),
                  balance=bool(rcfg.get("pseudo_balance", False)))


def candidates(rcfg: DictConfig) -> list[Recipe]:
    """``retrain.candidates`` (a mapping name -> recipe settings) as recipes, validated."""
    given = rcfg.get("candidates")
    if not given:
        raise ConfigError("retrain.candidates", "pseudo_targets=auto needs at least one candidate recipe")
    out = []
    for name, spec in OmegaConf.to_container(given, resolve=True).items():
        spec = dict(spec or {})
        bad = set(spec) - RECIPE_KEYS
        if bad:
            raise ConfigError(f"retrain.candidates.{name}",
                              f"unknown keys {sorted(bad)}; valid: {', '.join(sorted(RECIPE_KEYS))}")
        r = Recipe(str(name), **spec)
        if r.targets not in ("hard", "soft"):
            raise ConfigError(f"retrain.candidates.{name}.targets", f"must be hard or soft, got {r.targets!r}")
        if r.weight not in ("confidence", "one"):
            raise ConfigError(f"retrain.candidates.{name}.weight", f"must be confidence or one, got {r.weight!r}")
        if not 0 < float(r.top) <= 1:
            raise ConfigError(f"retrain.candidates.{name}.top", f"must be in (0, 1], got {r.top}")
        if float(r.pseudo_scale) < 0:
            raise ConfigError(f"retrain.candidates.{name}.pseudo_scale", f"must be >= 0, got {r.pseudo_scale}")
        out.append(r)
    return out


def load_arrays(pl_dir: Path) -> dict[str, np.ndarray]:
    """rows, labels, confidence, labeled, noise (each (N,)) of a pseudolabel artifact or a validation fold."""
    return {k: np.load(Path(pl_dir) / f"{k}.npy") for k in ("rows", "labels", "confidence", "labeled", "noise")}


def balance_weights(labels: np.ndarray, w: np.ndarray, is_pseudo: np.ndarray, given: np.ndarray,
                    n_classes: int) -> np.ndarray:
    """Pseudo-label weights (n,) rescaled per class so that class c holds ``prior_c`` of the pseudo weight.

    ``labels``, ``w``, ``is_pseudo`` (n,): the training rows; ``given`` (n_l,): the given labels, whose
    class frequencies (add-one smoothed) are the prior. Given labels keep their weight.
    """
    prior = (np.bincount(np.asarray(given, np.int64), minlength=n_classes) + 1.0)
    prior /= prior.sum()
    w = np.asarray(w, np.float64).copy()
    if not is_pseudo.any():
        return w.astype(np.float32)
    have = np.bincount(labels[is_pseudo], weights=w[is_pseudo], minlength=n_classes)
    present = have > 0
    target = prior * present / max(float((prior * present).sum()), 1e-12) * have.sum()
    factor = np.where(present, target / np.maximum(have, 1e-12), 0.0)
    w[is_pseudo] *= factor[labels[is_pseudo]]
    return w.astype(np.float32)


def training_data(arrs: dict, recipe: Recipe, rcfg: DictConfig, embed, teacher, n_classes: int | None = None) -> dict:
    """What a head trains on under ``recipe``: rows, labels, w, is_pseudo (n,), X (n, D), targets (n, C) or None.

    ``embed(rows) -> (n, D)``; ``teacher(X) -> (n, C)`` logits of the labeled-only head; ``n_classes``
    (default: one more than the largest label) for ``balance``.
    """
    if n_classes is None:
        n_classes = int(max(arrs["labels"].max(), 0)) + 1
    sel = OmegaConf.create({"min_confidence": float(rcfg.min_confidence), "pseudo_weight": recipe.weight,
                            "drop_noisy": bool(rcfg.get("drop_noisy", True))})
    rows, labels, w, is_pseudo = select_training(arrs["rows"], arrs["labels"], arrs["confidence"],
                                                 arrs["labeled"], arrs["noise"], sel)
    conf_of = dict(zip(arrs["rows"].tolist(), np.asarray(arrs["confidence"], np.float32).tolist()))
    conf = np.array([conf_of[int(r)] for r in rows], np.float32)
    X = embed(rows)
    need_teacher = recipe.targets == "soft" or recipe.agree or recipe.top < 1
    logits = teacher(X) if need_teacher and is_pseudo.any() else None
    if (recipe.agree or recipe.top < 1) and logits is not None:
        use = filter_pseudo(labels, conf, ~is_pseudo, logits, "agree" if recipe.agree else "none", float(recipe.top))
        keep = use >= 0
        rows, labels, w, is_pseudo, X, conf, logits = (a[keep] for a in (rows, use, w, is_pseudo, X, conf, logits))
    w = np.where(is_pseudo, w * float(recipe.pseudo_scale), w).astype(np.float32)
    keep = ~is_pseudo | (w > 0)
    rows, labels, w, is_pseudo, X, conf = (a[keep] for a in (rows, labels, w, is_pseudo, X, conf))
    if recipe.balance:
        w = balance_weights(labels, w, is_pseudo, arrs["labels"][arrs["labeled"].astype(bool)], int(n_classes))
    targets = None
    if recipe.targets == "soft" and is_pseudo.any():
        t = float(rcfg.get("teacher_temperature", 1.0))
        probs = torch.softmax(torch.from_numpy(logits[keep]) / t, -1).numpy()
        targets = soft_targets(labels, conf, ~is_pseudo, probs)
    return {"rows": rows, "labels": labels, "w": w, "is_pseudo": is_pseudo, "X": X, "targets": targets}


def choose(scores: dict[str, tuple[int, float]], order: list[str], by: str = "logloss") -> str:
    """The recipe with the lowest summed held-out log-loss (``by="logloss"``, ties: more rows right) or the most
    held-out rows right (``by="accuracy"``, ties: lower log-loss); then earlier in ``order``.

    ``scores``: name -> (held-out rows right, summed held-out log-loss). The log-loss scores each held-out
    row's whole posterior, not one right/wrong bit: on a few dozen held-out labels it separates candidates
    that the count of rows right leaves to chance.
    """
    if by == "logloss":
        return min(order, key=lambda n: (scores[n][1], -scores[n][0], order.index(n)))
    if by == "accuracy":
        return min(order, key=lambda n: (-scores[n][0], scores[n][1], order.index(n)))
    raise ConfigError("retrain.choose_by", f"must be logloss or accuracy, got {by!r}")
