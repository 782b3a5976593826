"""The multi-label recipe inside the pipeline's stages (pseudolabel, retrain) and its run-directory exports.

* **pseudolabel** (:func:`build_pseudolabels`): the labeler of ``cfg.multilabel.labeler``
  (default :class:`~ssl_pipeline.multilabel.labeler.CSALabeler`) on the encode
  stage's spatial tokens, smoothed over the cluster stage's kNN graph; writes the
  pseudo-labels, the trained teacher head and the label contexts. ``val/map``: the
  same labeler refitted with a held-out fold of the labeled images hidden, its
  pseudo-label scores on that fold (macro mAP).
* **retrain** (:func:`build_retrain`): the semi-supervised head (the teacher the
  pseudo-labels came from) against the same head trained on the labeled images
  only (same seed, steps, augmentation), both scored on the test split
  (``retrain/test_map``, ``retrain/labeled_only_test_map``, ``retrain/gain``);
  ``val/retrain_map`` (also ``val/map``): the fold fit's teacher on the held-out fold.

Run-directory exports: :mod:`ssl_pipeline.multilabel.exports` (the pseudo-label CSVs, the label
contexts) and :mod:`ssl_pipeline.multilabel.model_folder` (the student's arrays, ``<run dir>/model/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate

from ssl_pipeline import validation
from ssl_pipeline.artifacts import write_json
from ssl_pipeline.multilabel.contexts import context_targets
from ssl_pipeline.multilabel.features import features_of
from ssl_pipeline.multilabel.labeler import CSALabeler
from ssl_pipeline.multilabel.model_folder import save_student
from ssl_pipeline.multilabel.settings import macro_map, precision_at_k, settings
from ssl_pipeline.multilabel.train import fit, predict
from ssl_pipeline.stage_io import load_graph, read_arrays, write_arrays

log = logging.getLogger(__name__)


def make_labeler(cfg, s: dict):
    """``cfg.multilabel.labeler`` (a ``_target_``) given the settings and seed; CSALabeler when absent."""
    ml = cfg.get("multilabel")
    if ml is not None and ml.get("labeler") is not None:
        return instantiate(ml.labeler, settings=s, seed=int(cfg.seed))
    return CSALabeler(s, int(cfg.seed))


def _inputs(ctx):
    feats = features_of(ctx.path("encode"), ctx.table)
    rows = np.load(ctx.path("cluster") / "rows.npy")
    pos = np.searchsorted(feats.rows, rows)
    return feats, rows, pos


def build_pseudolabels(ctx, out: Path) -> dict:
    """The pseudolabel stage on multi-label data: fit, write the artifact into ``out``, return the metrics."""
    cfg, table = ctx.cfg, ctx.table
    s = settings(cfg)
    t0 = time.perf_counter()
    feats, rows, pos = _inputs(ctx)
    tokens = feats.tokens[pos]
    Y = np.asarray(table.y_true)[rows].astype(np.int8)
    labeled = np.asarray(table.labeled)[rows]
    graph = load_graph(ctx.path("cluster"))
    lab = make_labeler(cfg, s).fit(tokens, Y, labeled, graph, text=feats.text)
    unl = ~labeled
    m: dict = {"contexts/n_contexts": int(lab.contexts_["n_contexts"]), "train/n_labeled": int(labeled.sum()),
               "train/n_unlabeled": int(unl.sum()), "pseudolabel/n_labeled": int(labeled.sum())}
    for c, name in enumerate(table.classes):
        m[f"pseudolabel/pi/{name}"] = round(float(lab.pi_[c]), 4)
    if unl.any():
        Yu, dec = Y[unl], lab.decision_[unl]
        tp = int((dec & (Yu == 1)).sum())
        m["pseudolabel/precision"] = tp / max(int(dec.sum()), 1)
        m["pseudolabel/recall"] = tp / max(int(Yu.sum()), 1)
        m["pseudolabel/coverage"] = float(lab.counted_[unl].mean())
        m["pseudolabel/map"] = macro_map(Yu, lab.scores_[unl])
        m["pseudolabel/n_vetoed"] = int(lab.vetoed_[unl].sum())
        m["pseudolabel/n_unlabeled"] = int(unl.sum())
        for c, name in enumerate(table.classes):
            m[f"pseudolabel/threshold/{name}"] = round(float(lab.tau_[c]), 4) if np.isfinite(lab.tau_[c]) else None
    write_arrays(out, {"rows": rows, "labeled": labeled, "scores": lab.scores_, "decision": lab.decision_,
                       "counted": lab.counted_, "vetoed": lab.vetoed_})
    lab.save(out)
    groups = [[table.classes[c] for c in np.flatnonzero(lab.context_of_ == g)] for g in range(m["contexts/n_contexts"])]
    write_json(out / "contexts.json", {"contexts": groups, "eigenvalues": lab.contexts_["eigenvalues"],
                                       "affinity": lab.contexts_["affinity"], "classes": table.classes,
                                       "history": lab.history_})
    write_json(out / "labeler.json", {"name": "multilabel:" + str(cfg.get("multilabel", {}).get("name", "csa")),
                                      "class": type(lab).__name__, "params": s})
    m["train/seconds"] = m["pseudolabel/seconds"] = round(time.perf_counter() - t0, 2)
    m.update(_validate(cfg, s, tokens, Y, labeled, graph, feats.text, out))
    return m


def _validate(cfg, s: dict, tokens, Y, labeled, graph, text, out: Path) -> dict:
    """Refit with each held-out fold of labeled images hidden: ``val/map`` of its pseudo-label scores on the fold;
    the fold's teacher and pseudo-label scores of every row are kept (``val_teacher.npz``) for the retrain stage's
    choice of its student (:func:`ssl_pipeline.multilabel.student.choose`), and its pseudo-labels of the unlabeled
    rows (``unl_decision``, ``unl_counted``: (folds, n_unlabeled, C) bool) for the held-out choice of
    ``loss.unlabeled_weight=auto`` (:func:`choose_unlabeled_weight`)."""
    folds = validation.multilabel_folds(Y, labeled, validation.settings(cfg))
    if not folds:
        return {}
    t0 = time.perf_counter()
    held_all, pseudo, teacher, fold_teacher, fold_scores, unl_dec, unl_cnt = [], [], [], [], [], [], []
    for held in folds:
        lab_f = labeled.copy()
        lab_f[held] = False
        f = make_labeler(cfg, s).fit(tokens, Y, lab_f, graph, text=text)
        held_all.append(held)
        pseudo.append(f.scores_[held])
        teacher.append(f.teacher_scores_[held])
        fold_teacher.append(f.teacher_scores_.astype(np.float32))
        fold_scores.append(f.scores_.astype(np.float32))
        unl_dec.append(f.decision_[~labeled])  # the fold fit's pseudo-labels of the run's unlabeled rows
        unl_cnt.append(f.counted_[~labeled])
    held = np.concatenate(held_all)
    fold_id = np.concatenate([np.full(len(h), i) for i, h in enumerate(held_all)])
    np.savez(out / "val_teacher.npz", rows=held, teacher=np.concatenate(teacher), pseudo=np.concatenate(pseudo),
             fold=fold_id, fold_teacher=np.stack(fold_teacher), fold_scores=np.stack(fold_scores),
             fold_sizes=np.array([len(h) for h in held_all]), unl_decision=np.stack(unl_dec),
             unl_counted=np.stack(unl_cnt))
    v = macro_map(Y[held], np.concatenate(pseudo))
    log.info("pseudolabel: validation on %d held-out labeled images: mAP %.4f", len(held), v)
    return {"val/map": v, "val/pseudolabel_map": v, "val/n_heldout": len(held), "val/folds": len(folds),
            "val/seconds": round(time.perf_counter() - t0, 2)}


def retrain_key_config(cfg) -> dict:
    """What determines the multi-label retrain artifact: the recipe's settings, the seed, a dual-encoder loss."""
    from ssl_pipeline.retrain.options import multilabel_loss

    parts = {"multilabel": settings(cfg), "seed": int(cfg.seed)}
    if multilabel_loss(cfg) is not None:
        from ssl_pipeline.multilabel.unidec import loss_settings

        parts["loss"] = loss_settings(cfg)
    return parts


def test_metrics(Y: np.ndarray, S: np.ndarray, prefix: str = "retrain/test") -> dict:
    """Macro mAP, P@1 and P@5 of scores S (n, C) against labels Y (n, C)."""
    return {f"{prefix}_map": macro_map(Y, S), f"{prefix}_p@1": precision_at_k(Y, S, 1),
            f"{prefix}_p@5": precision_at_k(Y, S, 5)}


def choose_unlabeled_weight(pl_dir: Path, X_rows: np.ndarray, Y_rows: np.ndarray, labeled: np.ndarray, text,
                            name: str, kwargs: dict, s: dict, seed: int, grid: list | None = None,
                            keep: list | None = None) -> tuple[float, str, dict]:
    """``loss.unlabeled_weight=auto``: the weight of the pseudo-labeled rows, chosen on held-out labeled rows.

    For each held-out fold of the pseudolabel stage's validation (``val_teacher.npz``: the labeler refitted with
    the fold hidden, and that fit's pseudo-labels of the unlabeled rows, so neither the labels nor the
    pseudo-labels have seen the fold) the dual encoder is trained once per weight of
    ``s["unlabeled_weight_grid"]`` (0 = the labeled rows only) on the other labeled rows plus those
    pseudo-labels, with the run's settings and seed, and scored on the fold. The weight with the highest macro
    mAP over all held-out rows wins (ties: the smaller weight). Without a fold (``val.folds=0``,
    ``val.multilabel_folds=0``, too few labeled rows) or without unlabeled rows the weight is 0.

    X_rows (n, D) pooled embeddings and Y_rows (n, C) labels of the stage's rows, labeled (n,) bool.
    Returns (weight, source, metrics): ``val/map@unlabeled_weight=<w>`` per weight, ``val/retrain_map`` (also
    ``val/retrain_p@1``, ``val/retrain_p@5``) of the chosen one, ``val/unlabeled_weight_seconds``.
    ``grid``: the weights to try (default ``s["unlabeled_weight_grid"]``; one weight: a fixed weight's folds).
    ``keep``: a list that receives, per fold, (held positions, the chosen weight's fold model's fused scores
    of every row (n, C), not yet Platt-scaled: :func:`dual_encoder_platt`), for the retrain's student.
    """
    from ssl_pipeline.multilabel.unidec import fused_scores, train_dual_encoder

    f = Path(pl_dir) / "val_teacher.npz"
    v = np.load(f) if f.exists() else None
    if not (~labeled).any():
        return 0.0, "auto: no unlabeled rows", {}
    if v is None or "unl_decision" not in v.files or len(v["rows"]) == 0:
        if grid is not None:  # a fixed weight's folds: nothing to warn about, the student has no evidence either
            return 0.0, "no held-out fold", {}
        log.warning("retrain: loss.unlabeled_weight=auto found no held-out fold of the labeled rows (val.folds=0, "
                    "val.multilabel_folds=0 or too few labeled rows): the pseudo-labeled rows get weight 0; set "
                    "a number to use them")
        return 0.0, "auto: no held-out fold", {}
    t0 = time.perf_counter()
    grid = list(s["unlabeled_weight_grid"] if grid is None else grid)
    lab_idx, unl_idx = np.flatnonzero(labeled), np.flatnonzero(~labeled)
    bounds = np.cumsum(np.r_[0, v["fold_sizes"]])
    S: dict = {w: [] for w in grid}
    P_all: dict = {w: [] for w in grid}
    for i in range(len(v["fold_sizes"])):
        held = v["rows"][bounds[i]:bounds[i + 1]]
        fit_rows = np.setdiff1d(lab_idx, held)
        dec, cnt = v["unl_decision"][i], v["unl_counted"][i]
        for w in grid:
            unl = (X_rows[unl_idx], dec, cnt) if w > 0 else (None, None, None)
            model, _ = train_dual_encoder(X_rows[fit_rows], Y_rows[fit_rows], *unl, text, name, kwargs,
                                          dict(s, unlabeled_weight=w), seed)
            if keep is not None:
                S_all = fused_scores(model, X_rows, name, kwargs)["fused"]
                S[w].append(S_all[held])
                P_all[w].append((held, S_all))
            else:
                S[w].append(fused_scores(model, X_rows[held], name, kwargs)["fused"])
    Y_held = Y_rows[v["rows"]]
    vals = {w: test_metrics(Y_held, np.concatenate(S[w]), "val/retrain") for w in grid}
    m: dict = {f"val/map@unlabeled_weight={w:g}": vals[w]["val/retrain_map"] for w in grid}
    best = grid[int(np.argmax([np.nan_to_num(vals[w]["val/retrain_map"], nan=-1.0) for w in grid]))]  # ties: first
    m.update(vals[best])
    if keep is not None:
        keep.extend(P_all[best])
    m["val/unlabeled_weight_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("retrain: loss.unlabeled_weight=auto chose %g on %d held-out labeled rows (%s)", best, len(Y_held),
             ", ".join(f"{w:g}: {m[f'val/map@unlabeled_weight={w:g}']:.4f}" for w in grid))
    return best, "auto", m


def dual_encoder_platt(fold_scores: list, Y: np.ndarray, S_train: np.ndarray, fit_rows: np.ndarray
                       ) -> tuple[tuple[float, float], str]:
    """Platt (a, b) of ``sigmoid(a s + b)`` for the dual encoder's fused scores, one pair for all labels.

    Fitted on the pooled held-out rows of the validation folds: ``fold_scores`` lists, per fold, (held
    positions, that fold model's scores of every row (n, C)); Y (n, C) the rows' labels. A model's scores of
    its own training rows are memorised (on the 202-label mosaics the slope fitted there was 1.24 against 0.56
    on held-out rows), so a scale fitted there makes the probabilities overconfident and the student's mix
    with the logistic member is chosen on a wrong scale. Without folds: the final model's scores S_train (n, C)
    of its training rows ``fit_rows`` (the overconfident fallback, named in the returned source).
    Returns ((a, b), source): ``"held-out folds"`` or ``"training rows"``."""
    from ssl_pipeline.model.dual_encoder import platt_fit

    Y = np.asarray(Y)
    if fold_scores:
        held = np.concatenate([h for h, _ in fold_scores])
        S_held = np.concatenate([Sf[h] for h, Sf in fold_scores])
        return platt_fit(S_held, Y[held]), "held-out folds"
    return platt_fit(S_train[fit_rows], Y[fit_rows]), "training rows"


def _retrain_dual_encoder(ctx, out: Path) -> dict:
    """``loss=unidec`` / ``loss=psl``: the dual encoder on labeled + pseudo-labeled pooled embeddings vs the same
    model on the labeled rows only (:mod:`ssl_pipeline.multilabel.unidec`), both scored on the test split.

    The pseudo-labeled rows' weight is ``loss.unlabeled_weight``: a number, or ``auto`` (the default), chosen
    on held-out labeled rows (:func:`choose_unlabeled_weight`); at weight 0 the semi-supervised model is the
    labeled-only twin (trained once)."""
    from ssl_pipeline.model.dual_encoder import platt_probabilities
    from ssl_pipeline.multilabel.unidec import fused_scores, loss_settings, train_dual_encoder

    cfg, table = ctx.cfg, ctx.table
    seed = int(cfg.seed)
    name, kwargs, s = loss_settings(cfg)
    t0 = time.perf_counter()
    pl_dir = ctx.path("pseudolabel")
    feats = features_of(ctx.path("encode"), table)
    arr = read_arrays(pl_dir, ("rows", "labeled", "decision", "counted"))
    rows, labeled = arr["rows"], arr["labeled"].astype(bool)
    pos = np.full(len(table), -1, np.int64)
    pos[feats.rows] = np.arange(len(feats.rows))
    test = np.flatnonzero(table.test & (pos >= 0))
    Y = np.asarray(table.y_true).astype(np.int8)
    X = feats.pooled
    lab, unl = rows[labeled], rows[~labeled]
    text = feats.text if feats.text is not None else table.meta.get("text")
    if text is not None and np.asarray(text).shape[1] != X.shape[1]:
        text = None  # text embeddings in another space than the pooled features
    m: dict = {}
    fold_probs: list = []  # per fold: (held positions, the fold model's fused scores of every row)
    if s["unlabeled_weight"] == "auto":
        w, source, vm = choose_unlabeled_weight(pl_dir, X[pos[rows]], Y[rows], labeled, text, name, kwargs, s, seed,
                                                keep=fold_probs)
    else:
        w, source = float(s["unlabeled_weight"]), "fixed"
        # the fixed weight's fold models: the evidence the student's candidate is chosen on
        vm = choose_unlabeled_weight(pl_dir, X[pos[rows]], Y[rows], labeled, text, name, kwargs, s, seed,
                                     grid=[w], keep=fold_probs)[2]
    m.update(vm)
    s = dict(s, unlabeled_weight=w)
    runs = {}
    for which in ("labeled_only", "semi"):
        if which == "semi" and (w == 0 or not len(unl)):
            runs["semi"] = runs["labeled_only"]  # weight 0: the semi-supervised model is the labeled-only twin
            continue
        u = unl if which == "semi" else unl[:0]
        t1 = time.perf_counter()
        model, info = train_dual_encoder(
            X[pos[lab]], Y[lab], X[pos[u]] if len(u) else None, arr["decision"][~labeled] if len(u) else None,
            arr["counted"][~labeled] if len(u) else None, text, name, kwargs, s, seed)
        runs[which] = (model, info, round(time.perf_counter() - t1, 2))
    info = runs["semi"][1]
    m.update({"retrain/mode": "multilabel", "retrain/loss": name, "retrain/n_test": len(test),
              "retrain/n_train": len(rows), "retrain/unlabeled_weight": w, "retrain/unlabeled_weight_source": source,
              "retrain/label_init": info["label_init"], "retrain/n_refreshes": info["n_refreshes"],
              "retrain/hard_negative_hit_rate": info["hard_negative_hit_rate"],
              "retrain/train_seconds": runs["semi"][2], "retrain/labeled_only_train_seconds": runs["labeled_only"][2],
              "val/source": "pseudolabel"})
    # the student over the dual encoder, as over the alignment head of the default recipe (fit_retrain_student),
    # on one probability scale fitted where no model saw the rows (dual_encoder_platt)
    S_rows = fused_scores(runs["semi"][0], X[pos[rows]], name, kwargs)["fused"]
    platt, m["retrain/platt_source"] = dual_encoder_platt(fold_probs, Y[rows], S_rows, np.flatnonzero(labeled))
    m["retrain/platt_a"], m["retrain/platt_b"] = round(platt[0], 4), round(platt[1], 4)
    fold_probs = [(h, platt_probabilities(Sf, *platt)) for h, Sf in fold_probs]
    student, sm = _dual_encoder_student(ctx, pl_dir, X[pos[rows]], Y[rows], labeled,
                                        platt_probabilities(S_rows, *platt), fold_probs)
    m.update(sm)
    arrays = {"rows_test": test}
    if len(test):
        S = fused_scores(runs["semi"][0], X[pos[test]], name, kwargs)
        S_lab = fused_scores(runs["labeled_only"][0], X[pos[test]], name, kwargs)
        S_semi = student.scores(X[pos[test]], platt_probabilities(S["fused"], *platt))
        m.update(test_metrics(Y[test], S_semi))
        m.update(test_metrics(Y[test], S_lab["fused"], "retrain/labeled_only_test"))
        m.update(test_metrics(Y[test], S["fused"], "retrain/dual_encoder_test"))
        if name == "unidec" and float(kwargs.get("lam", 1.0)) > 0:
            m["retrain/test_map_de"] = macro_map(Y[test], S["de"])
            m["retrain/test_map_clf"] = macro_map(Y[test], S["clf"])
        m["retrain/gain"] = m["retrain/test_map"] - m["retrain/labeled_only_test_map"]
        arrays.update(test_scores=S_semi, test_scores_dual_encoder=S["fused"], test_scores_labeled_only=S_lab["fused"])
    write_arrays(out, arrays)
    save_student(student, out)
    write_json(out / "platt.json", {"a": platt[0], "b": platt[1]})
    for which, (model, _, _) in runs.items():
        torch.save(model.state_dict(), out / ("dual_encoder.pt" if which == "semi" else "dual_encoder_labeled_only.pt"))
    m["retrain/seconds"] = round(time.perf_counter() - t0, 2)
    log.info("retrain: loss=%s dual encoder (unlabeled_weight %g, %s), test mAP %.4f (labeled only %.4f)", name, w,
             source, m.get("retrain/test_map", -1), m.get("retrain/labeled_only_test_map", -1))
    return m


def _dual_encoder_student(ctx, pl_dir: Path, X: np.ndarray, Y: np.ndarray, labeled: np.ndarray, P: np.ndarray,
                          fold_probs: list):
    """The student (:mod:`ssl_pipeline.multilabel.student`) over the dual encoder's probabilities P (n, C) of the
    n training rows (pooled X (n, D), labels Y (n, C)): its candidate chosen on the held-out folds, each with that
    fold's dual encoder (``fold_probs``) and its labeler's pseudo-label scores (``val_teacher.npz``); without
    folds the dual encoder alone. Returns (student, metrics)."""
    from ssl_pipeline.multilabel.student import Candidate, choose, fit_student

    st = settings(ctx.cfg)["student"]
    arr = read_arrays(pl_dir, ("scores",))
    Yf = np.asarray(Y, np.float32)
    m: dict = {}
    f = pl_dir / "val_teacher.npz"
    v = np.load(f) if f.exists() and fold_probs else None
    if v is not None and "fold_scores" in v.files and len(v["fold_scores"]) == len(fold_probs):
        t0 = time.perf_counter()
        folds = [(held, Pf, v["fold_scores"][i]) for i, (held, Pf) in enumerate(fold_probs)]
        cand, vals = choose(X, Yf, labeled, folds, st)
        m.update({f"val/student/{k}": round(x, 4) for k, x in vals.items()})
        m.update({"val/student_map": vals[cand.name], "val/student_seconds": round(time.perf_counter() - t0, 2),
                  "val/dual_encoder_map": vals.get(Candidate(0.0, 1.0, 0.0).name)})
    else:
        cand = Candidate(0.0, 1.0, 0.0)
    m.update({"retrain/student": cand.name, "retrain/student_lambda": cand.lam,
              "retrain/student_head_weight": cand.w, "retrain/student_knn_alpha": cand.alpha})
    return fit_student(cand, X, Yf, labeled, arr["scores"], P, st), m


def _student_folds(pl_dir: Path, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The pseudolabel stage's held-out folds as :func:`~ssl_pipeline.multilabel.student.choose` reads them:
    (held positions, the fold labeler's head scores (n, C), its pseudo-label scores (n, C)); [] without folds."""
    f = pl_dir / "val_teacher.npz"
    if not f.exists():
        return []
    v = np.load(f)
    if "fold_teacher" not in v or v["fold_teacher"].shape[1] != n:
        return []
    return [(v["rows"][v["fold"] == i], v["fold_teacher"][i], v["fold_scores"][i])
            for i in range(len(v["fold_teacher"]))]


def fit_retrain_student(ctx, s: dict, semi: CSALabeler, feats, pos: np.ndarray, pl_dir: Path):
    """The student of the retrain (:mod:`ssl_pipeline.multilabel.student`): its candidate chosen on the held-out
    folds (without folds: the head alone), fitted on all training rows. Returns (student, val metrics,
    training-row arrays: rows, pooled X, head scores)."""
    from ssl_pipeline.multilabel.student import Candidate, choose, fit_student

    table, st = ctx.table, s["student"]
    arr = read_arrays(pl_dir, ("rows", "labeled", "scores"))
    rows, labeled = arr["rows"], arr["labeled"].astype(bool)
    Y = np.asarray(table.y_true)[rows].astype(np.float32)
    X = feats.pooled[pos[rows]]
    H = predict(semi.head_, semi.transform(feats.tokens[pos[rows]]))[0]
    folds = _student_folds(pl_dir, len(rows))
    m: dict = {}
    if folds:
        t0 = time.perf_counter()
        cand, vals = choose(X, Y, labeled, folds, st)
        m.update({f"val/student/{k}": round(v, 4) for k, v in vals.items()})
        m.update({"val/student_map": vals[cand.name], "val/student_seconds": round(time.perf_counter() - t0, 2)})
        m["val/logreg_map"] = vals.get(Candidate(0.0, 0.0, 0.0).name)
        m["val/head_map"] = vals.get(Candidate(0.0, 1.0, 0.0).name)
    else:
        cand = Candidate(0.0, 1.0, 0.0)
    m.update({"retrain/student": cand.name, "retrain/student_lambda": cand.lam,
              "retrain/student_head_weight": cand.w, "retrain/student_knn_alpha": cand.alpha,
              "retrain/uses_unlabeled": bool(cand.w > 0 or cand.lam > 0 or cand.alpha > 0)})
    student = fit_student(cand, X, Y, labeled, arr["scores"], H, st)
    return student, m, (rows, labeled, X, H, Y)


def build_retrain(ctx, out: Path) -> dict:
    """The retrain stage on multi-label data: the student (:func:`fit_retrain_student`: the semi-supervised
    alignment head, a pooled linear model on labeled + pseudo-labeled images, neighbour smoothing, mixed as the
    held-out folds choose) vs the alignment head on the labeled images only and a logistic regression on their
    pooled embeddings, on the test split (``loss=unidec`` / ``psl``: the dual encoder instead,
    :func:`_retrain_dual_encoder`)."""
    from ssl_pipeline.multilabel.student import Candidate, fit_student
    from ssl_pipeline.retrain.options import multilabel_loss

    if multilabel_loss(ctx.cfg) is not None:
        return _retrain_dual_encoder(ctx, out)
    cfg, table = ctx.cfg, ctx.table
    s, seed = settings(cfg), int(cfg.seed)
    t0 = time.perf_counter()
    pl_dir = ctx.path("pseudolabel")
    feats = features_of(ctx.path("encode"), ctx.table)
    semi = CSALabeler.load(pl_dir, s, seed)
    pos = np.full(len(table), -1, np.int64)
    pos[feats.rows] = np.arange(len(feats.rows))
    test = np.flatnonzero(table.test & (pos >= 0))
    student, mv, (rows, labeled, X, H, Y_rows) = fit_retrain_student(ctx, s, semi, feats, pos, pl_dir)
    lab = rows[labeled]
    Y = np.asarray(table.y_true).astype(np.int8)
    tok_lab, tok_test = semi.transform(feats.tokens[pos[lab]]), semi.transform(feats.tokens[pos[test]])
    Y_lab = Y[lab]
    ctx_lab = context_targets(Y_lab, semi.context_of_)
    lab_only = fit(semi.new_head(), tok_lab, torch.from_numpy(Y_lab.astype(np.float32)), torch.from_numpy(ctx_lab),
                   None, None, s, seed)
    H_test, _ = predict(semi.head_, tok_test)
    S_semi = student.scores(feats.pooled[pos[test]], H_test)
    S_lab, _ = predict(lab_only.teacher, tok_test)
    logreg = fit_student(Candidate(0.0, 0.0, 0.0), X, Y_rows, labeled, Y_rows, H, s["student"])
    S_lr = logreg.scores(feats.pooled[pos[test]], H_test)
    m: dict = {"retrain/mode": "multilabel", "retrain/n_test": len(test), "retrain/n_train": len(rows), **mv}
    if len(test):
        m.update(test_metrics(Y[test], S_semi))
        m.update(test_metrics(Y[test], S_lab, "retrain/labeled_only_test"))
        m["retrain/head_test_map"] = macro_map(Y[test], H_test)
        m["retrain/logreg_test_map"] = macro_map(Y[test], S_lr)
        m["retrain/gain"] = m["retrain/test_map"] - m["retrain/labeled_only_test_map"]
        m["retrain/gain_vs_best_baseline"] = m["retrain/test_map"] - max(m["retrain/labeled_only_test_map"],
                                                                        m["retrain/logreg_test_map"])
    if (pl_dir / "val_teacher.npz").exists():
        v = np.load(pl_dir / "val_teacher.npz")
        m["val/retrain_map"] = m["val/map"] = m.get("val/student_map", macro_map(Y[rows[v["rows"]]], v["teacher"]))
    write_arrays(out, {"rows_test": test, "test_scores": S_semi, "test_scores_labeled_only": S_lab,
                       "test_scores_head": H_test, "test_scores_logreg": S_lr})
    save_student(student, out)
    torch.save(lab_only.teacher.state_dict(), out / "head_labeled_only.pt")
    m["retrain/seconds"] = round(time.perf_counter() - t0, 2)
    log.info("retrain: student %s, test mAP %.4f (head %.4f, labeled-only head %.4f, logistic regression %.4f)",
             student.cand.name, m.get("retrain/test_map", -1), m.get("retrain/head_test_map", -1),
             m.get("retrain/labeled_only_test_map", -1), m.get("retrain/logreg_test_map", -1))
    return m
