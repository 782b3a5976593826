"""Settings of the multi-label recipe (``cfg.multilabel``) and shared helpers: macro mAP, token PCA."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig, OmegaConf
from sklearn.metrics import average_precision_score

from ssl_pipeline.errors import ConfigError

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
    "student": {                 # the retrain's pooled-feature student (ssl_pipeline.multilabel.student)
        "lambdas": [0.0, 1.0, 3.0],    # weights of the pseudo-labeled images in its linear fit (0 = labeled only)
        "head_weights": [0.0, 0.5, 1.0],  # weights of the alignment head in the mix (1 = the head alone)
        "knn_alphas": [0.0, 0.5],      # weights of the neighbour vote over the training images
        "C": 10.0,                     # inverse L2 strength of the linear member (scikit-learn's C)
        "knn_k": 10,
        "knn_power": 3.0,
    },
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
    over.pop("labeler", None)
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
    st = s["student"] = dict(s["student"])
    for k in ("lambdas", "head_weights", "knn_alphas"):
        vals = st[k] if isinstance(st[k], (list, tuple)) else [st[k]]
        if not vals:
            raise ConfigError(f"multilabel.student.{k}", "must list at least one value")
        lo, hi = (0.0, float("inf")) if k == "lambdas" else (0.0, 1.0)
        for v in vals:
            if not lo <= float(v) <= hi:
                raise ConfigError(f"multilabel.student.{k}", f"values must be in [{lo:g}, {hi:g}], got {v}")
        st[k] = [float(v) for v in vals]
    if float(st["C"]) <= 0 or int(st["knn_k"]) < 1:
        raise ConfigError("multilabel.student", f"C must be > 0 and knn_k >= 1, got C={st['C']}, "
                          f"knn_k={st['knn_k']}")
    return s


def macro_map(Y: np.ndarray, S: np.ndarray) -> float:
    """Macro mean average precision over the labels with at least one positive in ``Y`` (n, C)."""
    cols = [c for c in range(Y.shape[1]) if Y[:, c].any()]
    if not cols:
        return float("nan")
    return float(np.mean([average_precision_score(Y[:, c], S[:, c]) for c in cols]))


def token_pca(tokens: np.ndarray, fit_pos: np.ndarray, dim: int, seed: int,
              max_images: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """PCA of spatial tokens (M, P, d) -> (mean (d,), W (d, dim)) float32, fitted on <= max_images images.

    The projection is fitted on the covariance of the tokens of a seeded sample
    of ``fit_pos`` (train images only: no test image shapes it).
    """
    rng = np.random.default_rng(seed)
    pick = rng.choice(fit_pos, min(len(fit_pos), max_images), replace=False)
    sample = tokens[np.sort(pick)].reshape(-1, tokens.shape[-1]).astype(np.float32)
    mu = sample.mean(0)
    sample -= mu
    _, V = np.linalg.eigh((sample.T @ sample).astype(np.float64) / max(len(sample) - 1, 1))
    return mu, np.ascontiguousarray(V[:, ::-1][:, :dim], dtype=np.float32)


def project_tokens(tokens: np.ndarray, mu: np.ndarray, W: np.ndarray) -> np.ndarray:
    """(M, P, d) tokens -> (M, P, dim) float16 through a :func:`token_pca` projection."""
    out = np.empty(tokens.shape[:2] + (W.shape[1],), np.float16)
    for i in range(0, len(tokens), 256):
        out[i:i + 256] = ((tokens[i:i + 256].astype(np.float32) - mu) @ W).astype(np.float16)
    return out


def reduce_tokens(tokens: np.ndarray, fit_pos: np.ndarray, dim: int, seed: int,
                  max_images: int = 200) -> np.ndarray:
    """PCA of spatial tokens: (M, P, d) -> (M, P, dim) float16 (:func:`token_pca` then :func:`project_tokens`)."""
    return project_tokens(tokens, *token_pca(tokens, fit_pos, dim, seed, max_images))




def precision_at_k(Y: np.ndarray, S: np.ndarray, k: int) -> float:
    """P@k: mean over rows of (positives among the row's ``k`` highest-scored labels) / k; Y, S (n, C)."""
    if len(Y) == 0:
        return float("nan")
    k = min(int(k), Y.shape[1])
    top = np.argpartition(-np.asarray(S), k - 1, axis=1)[:, :k]
    return float(np.take_along_axis(np.asarray(Y), top, axis=1).sum(1).mean() / k)
