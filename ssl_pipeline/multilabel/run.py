"""The whole multi-label path: tokens -> contexts -> pseudo-labels -> semi-supervised head vs labeled-only head.

``run(cfg, table, cache, run_dir) -> metrics`` for a multi-label
:class:`SampleTable` (``data=multilabel_csv`` / ``data=multilabel_demo``):

1. **encode** (:mod:`.features`, cached stage ``multilabel_encode``): spatial
   tokens + pooled embeddings of every image (and class-name text embeddings
   when the backbone has a trained text tower).
2. **contexts** (:mod:`.contexts`): spectral clustering of the labeled
   co-occurrence matrix; M by eigengap.
3. **train** (cached stage ``multilabel_train``): the alignment head
   (:mod:`.head`) trained with refreshed class-aware pseudo-labels
   (:mod:`.pseudo`), and the same head on labeled images only (same seed,
   steps, augmentation), both scored on the test split (macro mAP).
4. **exports** to ``run_dir``: ``pseudolabels_multilabel.csv`` (one row per
   unlabeled image and label), ``pseudolabels.csv`` (the generic audit format,
   one row per unlabeled image), ``contexts.json``, ``skipped.csv``.

Metrics (flat ``<stage>/<name>``): ``retrain/test_map`` and
``retrain/labeled_only_test_map`` (macro mAP over the labels with a test
positive), ``retrain/gain``; ``pseudolabel/precision`` / ``recall`` (micro, over
the unlabeled images' final pseudo-labels), ``pseudolabel/coverage`` (share of
unlabeled image-label entries that train the model: outside the masked band and
not vetoed), ``pseudolabel/map`` (macro mAP of the smoothed scores on the
unlabeled images), ``pseudolabel/threshold/<label>``, ``pseudolabel/pi/<label>``,
``pseudolabel/n_vetoed``, ``contexts/n_contexts``, ``encode/*``, ``train/*``.

``stage=encode`` stops after step 1; any later stage runs everything (the
pseudo-labels need the trained head). Settings come from ``cfg.multilabel`` (conf/multilabel/default.yaml) over
:data:`DEFAULTS`, so a root config without that group still runs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import average_precision_score

from ssl_pipeline.artifacts import ArtifactCache, atomic_save_npy, atomic_write_text, stable_hash, write_json
from ssl_pipeline.audit import COLUMNS
from ssl_pipeline.data.multilabel import draw_labeled_fraction
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError, DataError
from ssl_pipeline.multilabel.contexts import context_targets, spectral_contexts
from ssl_pipeline.multilabel.features import encode_tokens, load_features
from ssl_pipeline.multilabel.head import AlignmentHead, init_class_embeddings
from ssl_pipeline.multilabel.pseudo import PseudoLabels, knn_neighbours, knn_vote, make_pseudolabels
from ssl_pipeline.multilabel.thresholds import class_frequencies
from ssl_pipeline.multilabel.train import fit, predict

log = logging.getLogger(__name__)
STAGE = "multilabel_train"

DEFAULTS: dict = {
    "token_dim": 256,            # PCA of the spatial tokens to this many dimensions (null = keep all)
    "hidden": 128,               # hidden size of the shared token / class-embedding map
    "dropout": 0.1,
    "global_branch": True,       # add a linear score on the mean token to the alignment score
    "steps": 300,
    "lr": 1.0e-3,
    "weight_decay": 1.0e-2,
    "batch_labeled": 32,
    "batch_unlabeled": 96,
    "warmup_steps": 100,         # labeled-only steps before the first pseudo-labels
    "refresh_every": 50,         # pseudo-labels are rebuilt by the EMA teacher every this many steps
    "ema": 0.99,
    "token_keep_min": 0.5,       # the student keeps a random U(token_keep_min, 1) share of the tokens
    "unlabeled_weight": 2.0,
    "context_weight": 0.5,
    "asl": {"gamma_neg": 2.0, "gamma_pos": 0.0, "clip": 0.0},
    "text_embeddings": True,     # use class-name text embeddings when the backbone has a trained text tower
    "pseudo": {
        "band": 0.25,            # masked band around each class's cut, relative to its expected positive count
        "prior_strength": 2.0,   # pseudo-images shrinking labeled class frequencies towards their mean
        "knn_k": 10,
        "knn_alpha": 0.7,        # weight of the neighbourhood vote; 0 = no smoothing
        "knn_power": 3.0,
        "context_veto": True,
    },
    "contexts": {"n_contexts": None, "min_contexts": 2, "max_contexts": None},
}


def _merge(base: dict, over: dict, prefix: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ConfigError(f"{prefix}.{k}", f"unknown multi-label setting; valid: {', '.join(sorted(base))}")
        out[k] = _merge(base[k], v, f"{prefix}.{k}") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def settings(cfg: DictConfig) -> dict:
    """``cfg.multilabel`` merged over :data:`DEFAULTS`, validated (ConfigError names the key)."""
    over = cfg.get("multilabel")
    over = OmegaConf.to_container(over, resolve=True) if over is not None else {}
    over.pop("name", None)
    s = _merge(DEFAULTS, over, "multilabel")
    for k in ("steps", "batch_labeled", "batch_unlabeled", "refresh_every", "hidden"):
        if int(s[k]) < 1:
            raise ConfigError(f"multilabel.{k}", f"must be >= 1, got {s[k]}")
    if not 0 <= int(s["warmup_steps"]) < int(s["steps"]):
        raise ConfigError("multilabel.warmup_steps", f"must be in [0, steps={s['steps']}), got {s['warmup_steps']}")
    if not 0.0 <= float(s["pseudo"]["band"]) < 1.0:
        raise ConfigError("multilabel.pseudo.band", f"must be in [0, 1), got {s['pseudo']['band']}")
    if not 0.0 <= float(s["pseudo"]["knn_alpha"]) <= 1.0:
        raise ConfigError("multilabel.pseudo.knn_alpha", f"must be in [0, 1], got {s['pseudo']['knn_alpha']}")
    if not 0.0 < float(s["token_keep_min"]) <= 1.0:
        raise ConfigError("multilabel.token_keep_min", f"must be in (0, 1], got {s['token_keep_min']}")
    if not 0.0 <= float(s["ema"]) < 1.0:
        raise ConfigError("multilabel.ema", f"must be in [0, 1), got {s['ema']}")
    return s


def macro_map(Y: np.ndarray, S: np.ndarray) -> float:
    """Macro mean average precision over the labels with at least one positive in ``Y`` (n, C)."""
    cols = [c for c in range(Y.shape[1]) if Y[:, c].any()]
    if not cols:
        return float("nan")
    return float(np.mean([average_precision_score(Y[:, c], S[:, c]) for c in cols]))


def _forced(cfg: DictConfig, stage: str) -> bool:
    f = cfg.get("force") or []
    if f == "all":
        return True
    f = [f] if isinstance(f, str) else list(f)
    return stage in f or "all" in f


def reduce_tokens(tokens: np.ndarray, fit_pos: np.ndarray, dim: int, seed: int,
                  max_images: int = 200) -> np.ndarray:
    """PCA of spatial tokens: (M, P, d) -> (M, P, dim) float16, fitted on the tokens of <= max_images images.

    The projection is fitted on the covariance of the tokens of a seeded sample
    of ``fit_pos`` (train images only: no test image shapes it).
    """
    rng = np.random.default_rng(seed)
    pick = rng.choice(fit_pos, min(len(fit_pos), max_images), replace=False)
    sample = tokens[np.sort(pick)].reshape(-1, tokens.shape[-1]).astype(np.float32)
    mu = sample.mean(0)
    sample -= mu
    _, V = np.linalg.eigh((sample.T @ sample).astype(np.float64) / max(len(sample) - 1, 1))
    W = np.ascontiguousarray(V[:, ::-1][:, :dim], dtype=np.float32)
    out = np.empty(tokens.shape[:2] + (dim,), np.float16)
    for i in range(0, len(tokens), 256):
        out[i:i + 256] = ((tokens[i:i + 256].astype(np.float32) - mu) @ W).astype(np.float16)
    return out


def _train(s: dict, table: SampleTable, feats, lab: np.ndarray, unl: np.ndarray, test: np.ndarray, seed: int,
           out: Path) -> dict:
    """Fit both heads and write the stage's arrays into ``out``; return the stage metrics."""
    t0 = time.perf_counter()
    Y = np.asarray(table.y_true).astype(np.int8)
    pos = np.full(len(table), -1, np.int64)
    pos[feats.rows] = np.arange(len(feats.rows))
    use_text = feats.text is not None and bool(s["text_embeddings"])
    tok_np = feats.tokens
    if s["token_dim"] and int(s["token_dim"]) < tok_np.shape[-1] and not use_text:
        tok_np = reduce_tokens(tok_np, pos[np.r_[lab, unl]], int(s["token_dim"]), seed)
    tokens = torch.from_numpy(tok_np)
    tok_lab, tok_unl, tok_test = tokens[pos[lab]], tokens[pos[unl]], tokens[pos[test]]
    Y_lab = Y[lab]
    cs = s["contexts"]
    context_of, cinfo = spectral_contexts(Y_lab, cs["n_contexts"], int(cs["min_contexts"]), cs["max_contexts"], seed)
    M = cinfo["n_contexts"]
    ctx_lab = context_targets(Y_lab, context_of)
    ps = s["pseudo"]
    pi = class_frequencies(Y_lab, float(ps["prior_strength"]))
    pi_ctx = class_frequencies(ctx_lab, float(ps["prior_strength"]))
    class_embed = feats.text if use_text else init_class_embeddings(tok_lab.float().numpy(), Y_lab)

    def new_head() -> AlignmentHead:
        torch.manual_seed(seed)
        return AlignmentHead(tokens.shape[-1], class_embed, context_of, hidden=int(s["hidden"]),
                             dropout=float(s["dropout"]), global_branch=bool(s["global_branch"]))

    n_l = len(lab)
    k = int(ps["knn_k"])
    alpha = float(ps["knn_alpha"])
    if alpha > 0 and k > 0 and len(unl):
        sims, idx = knn_neighbours(feats.pooled[pos[np.r_[lab, unl]]], k)
    else:
        sims = idx = None

    def refresh(teacher: AlignmentHead) -> PseudoLabels:
        p, pc = predict(teacher, tok_unl)
        if sims is not None:
            vote = knn_vote(np.concatenate([Y_lab.astype(np.float32), p]), sims, idx, float(ps["knn_power"]))[n_l:]
            p = (1.0 - alpha) * p + alpha * vote
        return make_pseudolabels(p, pi, float(ps["band"]), context_of, pc, pi_ctx, bool(ps["context_veto"]))

    y_lab_t = torch.from_numpy(Y_lab.astype(np.float32))
    ctx_lab_t = torch.from_numpy(ctx_lab)
    log.info("multilabel: %d labeled, %d unlabeled, %d test images; %d labels in %d contexts", n_l, len(unl),
             len(test), Y.shape[1], M)
    semi = fit(new_head(), tok_lab, y_lab_t, ctx_lab_t, tok_unl, refresh if len(unl) else None, s, seed)
    lab_only = fit(new_head(), tok_lab, y_lab_t, ctx_lab_t, None, None, s, seed)
    final = refresh(semi.teacher) if len(unl) else None
    S_semi, _ = predict(semi.teacher, tok_test)
    S_lab, _ = predict(lab_only.teacher, tok_test)
    m: dict = {"contexts/n_contexts": M, "train/seconds": round(time.perf_counter() - t0, 2),
               "train/n_labeled": n_l, "train/n_unlabeled": len(unl), "retrain/n_test": len(test)}
    for c, name in enumerate(table.classes):
        m[f"pseudolabel/pi/{name}"] = round(float(pi[c]), 4)
    if len(test):
        m["retrain/test_map"] = macro_map(Y[test], S_semi)
        m["retrain/labeled_only_test_map"] = macro_map(Y[test], S_lab)
        m["retrain/gain"] = m["retrain/test_map"] - m["retrain/labeled_only_test_map"]
    if final is not None:
        Yu = Y[unl]
        dec = final.decision
        tp = int((dec & (Yu == 1)).sum())
        m["pseudolabel/precision"] = tp / max(int(dec.sum()), 1)
        m["pseudolabel/recall"] = tp / max(int(Yu.sum()), 1)
        m["pseudolabel/coverage"] = float(final.counted.mean())
        m["pseudolabel/map"] = macro_map(Yu, final.scores)
        m["pseudolabel/n_vetoed"] = int(final.vetoed.sum())
        m["pseudolabel/n_unlabeled"] = len(unl)
        for c, name in enumerate(table.classes):
            m[f"pseudolabel/threshold/{name}"] = round(float(final.tau[c]), 4) if np.isfinite(final.tau[c]) else None
        for a in ("scores", "decision", "counted", "vetoed"):
            atomic_save_npy(out / f"pseudo_{a}.npy", getattr(final, a))
    for a, v in (("rows_labeled", lab), ("rows_unlabeled", unl), ("rows_test", test), ("test_scores", S_semi),
                 ("test_scores_labeled_only", S_lab), ("context_of", context_of)):
        atomic_save_npy(out / f"{a}.npy", np.asarray(v))
    torch.save(semi.teacher.state_dict(), out / "head.pt")
    torch.save(lab_only.teacher.state_dict(), out / "head_labeled_only.pt")
    groups = [[table.classes[c] for c in np.flatnonzero(context_of == g)] for g in range(M)]
    write_json(out / "contexts.json", {"contexts": groups, "eigenvalues": cinfo["eigenvalues"],
                                       "affinity": cinfo["affinity"], "classes": table.classes,
                                       "history": semi.history})
    m["train/seconds"] = round(time.perf_counter() - t0, 2)
    return m


def _write_generic(rows: list[dict], run_dir: Path) -> None:
    """``pseudolabels.csv`` in the pipeline's audit columns (:data:`ssl_pipeline.audit.COLUMNS`)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(run_dir / "pseudolabels.csv", buf.getvalue())


def _export(table: SampleTable, stage_dir: Path, run_dir: Path) -> None:
    """Write ``pseudolabels_multilabel.csv`` and ``pseudolabels.csv`` from a train artifact."""
    unl = np.load(stage_dir / "rows_unlabeled.npy")
    if not len(unl) or not (stage_dir / "pseudo_scores.npy").exists():
        _write_generic([], run_dir)
        atomic_write_text(run_dir / "pseudolabels_multilabel.csv", "id,path,label,score,decision,masked,true\n")
        return
    S = np.load(stage_dir / "pseudo_scores.npy")
    D = np.load(stage_dir / "pseudo_decision.npy")
    K = np.load(stage_dir / "pseudo_counted.npy")
    V = np.load(stage_dir / "pseudo_vetoed.npy")
    Y = np.asarray(table.y_true)
    classes = table.classes
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "path", "label", "score", "decision", "masked", "vetoed", "true"])
    rows = []
    for i, r in enumerate(unl):
        known = bool((Y[r] >= 0).all())
        for c, name in enumerate(classes):
            w.writerow([table.ids[r], table.paths[r] or "", name, f"{S[i, c]:.6f}", int(D[i, c]), int(not K[i, c]),
                        int(V[i, c]), int(Y[r, c]) if known else ""])
        pred = [classes[c] for c in np.flatnonzero(D[i])]
        true = [classes[c] for c in np.flatnonzero(Y[r] == 1)] if known else []
        cert = np.where(D[i], S[i], 1.0 - S[i])
        rows.append({
            "id": table.ids[r], "path": table.paths[r] or "", "label": "|".join(pred), "label_id": -1,
            "confidence": f"{float(cert.mean()):.6f}", "source": "multilabel:csa", "tier": 0, "cluster": -1,
            "agreement": f"{float(K[i].mean()):.4f}", "noise": int(bool(V[i].any())),
            "true_label": "|".join(true) if known else "", "correct": int(D[i].astype(int).tolist() ==
                                                                          (Y[r] == 1).astype(int).tolist())
            if known else "",
        })
    atomic_write_text(run_dir / "pseudolabels_multilabel.csv", buf.getvalue())
    _write_generic(rows, run_dir)


def run(cfg: DictConfig, table: SampleTable, cache: ArtifactCache, run_dir: Path) -> dict:
    """Run the multi-label path for ``table``; write exports to ``run_dir``; return flat ``<stage>/<name>`` metrics."""
    if not table.multilabel:
        raise ConfigError("data", "the multi-label path needs a multi-label table (data=multilabel_csv or "
                                  "data=multilabel_demo)")
    s = settings(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.seed)
    metrics: dict = {"data/n_missing": int(table.meta.get("n_missing", 0))}
    enc_dir, m, enc_key = encode_tokens(cfg, table, cache, force=_forced(cfg, "encode"))
    metrics.update(m)
    atomic_write_text(run_dir / "skipped.csv", (enc_dir / "skipped.csv").read_text())
    if cfg.get("stage") == "encode":
        return metrics
    feats = load_features(enc_dir)
    if not len(feats.rows):
        raise DataError("no image of the table could be read (see skipped.csv)")
    available = np.zeros(len(table), bool)
    available[feats.rows] = True
    Y = np.asarray(table.y_true)
    labeled = table.labeled & available
    train = table.train & available
    lost = (~available & table.labeled).any()
    if lost or (Y[labeled].sum(0) == 0).any():
        frac = float(table.meta.get("labeled_fraction", max(labeled.mean(), 1e-3)))
        labeled = draw_labeled_fraction(Y, train, frac, seed)
        log.warning("multilabel: %d labeled images were unreadable; labeled set redrawn among readable ones",
                    int((~available & table.labeled).sum()))
    missing = [table.classes[c] for c in range(Y.shape[1]) if Y[labeled, c].sum() == 0]
    if missing:
        raise DataError(f"labels {missing} have no readable labeled positive image; raise data.labeled_fraction")
    lab = np.flatnonzero(labeled)
    unl = np.flatnonzero(train & ~labeled)
    test = np.flatnonzero(table.test & available)
    key = cache.key(STAGE, {"settings": s, "seed": seed,
                            "rows": stable_hash([lab.tolist(), unl.tolist(), test.tolist()]),
                            "labels": stable_hash(Y.tolist()), "version": 1}, enc_key)
    final = cache.path(STAGE, key)
    if cache.is_complete(STAGE, key) and not _forced(cfg, "pseudolabel") and not _forced(cfg, "retrain"):
        log.info("multilabel: reusing %s", final)
        stage_metrics = json.loads((final / "stage_metrics.json").read_text())
    else:
        with cache.writing(STAGE, key) as tmp:
            stage_metrics = _train(s, table, feats, lab, unl, test, seed, tmp)
            write_json(tmp / "stage_metrics.json", stage_metrics)
    metrics.update(stage_metrics)
    _export(table, final, run_dir)
    atomic_write_text(run_dir / "contexts.json", (final / "contexts.json").read_text())
    return metrics
