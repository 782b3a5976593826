"""retrain.pseudo_targets=auto: candidate recipes, their training sets, and the choice on validation folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_pipeline.errors import ConfigError
from ssl_pipeline.retrain import head, recipes
from ssl_pipeline.stage_io import write_arrays
from tests.conftest import make_config

C, D = 4, 16


def blobs(n_per: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(C * n_per, D) float32 points around C separated centres, and their classes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(C, D)) * 1.2
    y = np.repeat(np.arange(C), n_per)
    return (centres[y] + rng.normal(size=(len(y), D))).astype(np.float32), y


def pl_arrays(y: np.ndarray, labeled: np.ndarray, noise_rate: float, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    labels = y.copy()
    flip = ~labeled & (rng.random(len(y)) < noise_rate)
    labels[flip] = rng.integers(0, C, int(flip.sum()))
    conf = np.full(len(y), 0.8, np.float32)
    return {"rows": np.arange(len(y)), "labels": labels, "confidence": conf, "labeled": labeled,
            "noise": np.zeros(len(y), bool)}


def write_pl(tmp: Path, y: np.ndarray, noise_rate: float, n_folds: int = 3) -> Path:
    """A pseudolabel artifact with ``n_folds`` validation folds (held-out labeled rows removed from each)."""
    lab = np.zeros(len(y), bool)
    for c in range(C):
        lab[np.flatnonzero(y == c)[:6]] = True
    out = tmp / "pl"
    out.mkdir()
    write_arrays(out, pl_arrays(y, lab, noise_rate, 0))
    lab_rows = np.flatnonzero(lab)
    for f in range(n_folds):
        held = lab_rows[np.arange(len(lab_rows)) % n_folds == f]
        keep = np.ones(len(y), bool)
        keep[held] = False
        arrs = pl_arrays(y, lab & keep, noise_rate, 1 + f)
        fd = out / "val" / f"fold{f}"
        fd.mkdir(parents=True)
        write_arrays(fd, {k: v[keep] for k, v in arrs.items()})
        write_arrays(fd, {"heldout_rows": held})
    return out


def cfg_for(*extra: str):
    return make_config("retrain.steps=80", "retrain.logger=none", *extra)


def test_candidates_are_validated():
    cfg = cfg_for()
    names = [c.name for c in recipes.candidates(cfg.retrain)]
    assert names == ["trust", "top50", "soft"]
    with pytest.raises(ConfigError, match="retrain.candidates.x"):
        recipes.candidates(cfg_for("+retrain.candidates.x={targets: hard, bogus: 1}").retrain)
    with pytest.raises(ConfigError, match="retrain.candidates.y.targets"):
        recipes.candidates(cfg_for("+retrain.candidates.y={targets: fuzzy}").retrain)
    with pytest.raises(ConfigError, match="retrain.pseudo_targets"):
        recipes.fixed_recipe(cfg_for("retrain.pseudo_targets=fuzzy").retrain)


def test_training_data_filters_and_scales_pseudo_labels():
    X, y = blobs(20, 0)
    lab = np.zeros(len(y), bool)
    lab[::10] = True
    arrs = pl_arrays(y, lab, 0.5, 0)
    rcfg = cfg_for().retrain

    def embed(rows):
        return X[rows]

    def teacher(Z):  # a teacher that knows the truth
        return np.eye(C, dtype=np.float32)[y[[int(np.flatnonzero((X == z).all(1))[0]) for z in Z]]] * 10

    full = recipes.training_data(arrs, recipes.Recipe("h"), rcfg, embed, teacher)
    assert full["is_pseudo"].sum() == (~lab).sum() and full["targets"] is None
    agree = recipes.training_data(arrs, recipes.Recipe("a", agree=True), rcfg, embed, teacher)
    p = agree["is_pseudo"]
    assert (agree["labels"][p] == y[agree["rows"][p]]).all() and p.sum() < full["is_pseudo"].sum()
    top = recipes.training_data(arrs, recipes.Recipe("t", top=0.5), rcfg, embed, teacher)
    assert abs(top["is_pseudo"].sum() - full["is_pseudo"].sum() / 2) <= C
    none = recipes.training_data(arrs, recipes.Recipe("z", pseudo_scale=0.0), rcfg, embed, teacher)
    assert not none["is_pseudo"].any() and len(none["rows"]) == lab.sum()
    soft = recipes.training_data(arrs, recipes.Recipe("s", targets="soft", weight="one"), rcfg, embed, teacher)
    assert soft["targets"].shape == (len(soft["rows"]), C) and np.allclose(soft["targets"].sum(1), 1, atol=1e-5)
    assert (soft["w"] == 1).all()


def test_choose_breaks_ties_by_log_loss_then_order():
    assert recipes.choose({"a": (5, 3.0), "b": (6, 9.0)}, ["a", "b"], "accuracy") == "b"
    assert recipes.choose({"a": (6, 3.0), "b": (6, 2.0)}, ["a", "b"], "accuracy") == "b"
    assert recipes.choose({"a": (6, 2.0), "b": (6, 2.0)}, ["a", "b"], "accuracy") == "a"
    assert recipes.choose({"a": (5, 3.0), "b": (6, 9.0)}, ["a", "b"]) == "a"  # default: the lower log-loss
    assert recipes.choose({"a": (5, 2.0), "b": (6, 2.0)}, ["a", "b"]) == "b"
    with pytest.raises(ConfigError, match="retrain.choose_by"):
        recipes.choose({"a": (5, 2.0)}, ["a"], "vibes")


@pytest.mark.parametrize("noise,trusting", [(0.0, True), (0.9, False)], ids=["good-labels", "poor-labels"])
def test_select_recipe_trusts_good_pseudo_labels_and_distrusts_poor_ones(tmp_path, noise, trusting):
    X, y = blobs(60, 1)
    pl = write_pl(tmp_path, y, noise)
    cfg = cfg_for("~retrain.candidates",
                  "+retrain.candidates={full: {targets: hard, weight: one}, none: {pseudo_scale: 0.0}}")
    stats = head.feature_stats(X)
    recipe, m = head.select_recipe(cfg, pl, lambda rows: X[rows], C, stats)
    assert m["retrain/recipe_source"] == "validation" and m["val/retrain_folds"] == 3
    assert m["val/retrain_n_heldout"] == 6 * C
    assert set(m) >= {"val/retrain_accuracy/full", "val/retrain_accuracy/none", "val/retrain_accuracy"}
    assert (recipe.name == "full") == trusting, m
    assert m["val/retrain_accuracy"] == max(m["val/retrain_accuracy/full"], m["val/retrain_accuracy/none"])


def test_without_folds_the_first_candidate_is_used(tmp_path):
    X, y = blobs(10, 2)
    lab = np.zeros(len(y), bool)
    lab[::5] = True
    (tmp_path / "pl").mkdir()
    write_arrays(tmp_path / "pl", pl_arrays(y, lab, 0.0, 0))
    cfg = cfg_for()
    recipe, m = head.select_recipe(cfg, tmp_path / "pl", lambda rows: X[rows], C, head.feature_stats(X))
    assert recipe == recipes.candidates(cfg.retrain)[0] and m["retrain/recipe_source"] == "first_candidate"


def test_balance_gives_each_class_its_labeled_share_of_the_pseudo_weight():
    labels = np.array([0, 1, 2, 0, 0, 0, 0, 1, 2, 2])
    is_pseudo = np.array([False] * 3 + [True] * 7)
    w = recipes.balance_weights(labels, np.ones(10, np.float32), is_pseudo, np.array([0, 1, 2, 0, 1, 2]), 3)
    assert np.allclose(w[~is_pseudo], 1.0)
    per_class = np.bincount(labels[is_pseudo], weights=w[is_pseudo], minlength=3)
    assert np.allclose(per_class, 7 / 3) and np.isclose(w[is_pseudo].sum(), 7)
    # a class without pseudo-labels leaves its share to the others
    w = recipes.balance_weights(labels[:7], np.ones(7, np.float32), is_pseudo[:7], np.array([0, 1, 2]), 3)
    assert np.allclose(w[3:], 1.0)


def test_ensemble_averages_linear_heads_and_refuses_other_heads():
    from ssl_pipeline.retrain.head import fit_ensemble, fit_head

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 8)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    w = np.ones(60, np.float32)
    cfg = cfg_for("retrain.ensemble=3", "retrain.steps=20")
    avg = fit_ensemble(X, y, w, 2, cfg, 0)
    members = [fit_head(X, y, w, 2, cfg, s) for s in range(3)]
    want = torch.stack([m.head[1].weight for m in members]).mean(0)
    torch.testing.assert_close(avg.head[1].weight, want)
    with pytest.raises(ConfigError, match="retrain.ensemble"):
        fit_ensemble(X, y, w, 2, cfg_for("retrain.ensemble=2", "retrain.head=mlp", "retrain.steps=5"), 0)
