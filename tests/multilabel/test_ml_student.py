"""The multi-label retrain's student: its logistic regression is scikit-learn's, the held-out choice picks what
the folds favour (the pooled linear model when the head is noise, the head when it is right), the neighbour vote
skips the image itself, and the exported model computes the same scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from ssl_pipeline.errors import ConfigError
from ssl_pipeline.multilabel.head import AlignmentHead
from ssl_pipeline.multilabel.settings import DEFAULTS, macro_map, settings
from ssl_pipeline.multilabel.student import Candidate, candidates, choose, fit_linear, fit_student, neighbours
from tests.conftest import make_config

ST = DEFAULTS["student"]


def blobs(n=300, C=3, D=16, seed=0):
    """Unit-norm embeddings whose labels are linear in them: X (n, D), Y (n, C) 0/1."""
    rng = np.random.default_rng(seed)
    Y = (rng.random((n, C)) < 0.35).astype(np.float32)
    centres = rng.normal(size=(C, D)) * 1.5
    X = Y @ centres + rng.normal(size=(n, D))
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32), Y


def test_linear_member_is_scikit_learns_logistic_regression():
    X, Y = blobs()
    W, b = fit_linear(X, Y, np.ones(len(X)), C=10.0)
    for c in range(Y.shape[1]):
        ref = LogisticRegression(C=10.0, max_iter=5000, tol=1e-8).fit(X, Y[:, c]).decision_function(X)
        np.testing.assert_allclose(X @ W[:, c] + b[c], ref, rtol=1e-3, atol=2e-3)


def test_candidates_include_both_baselines():
    names = [c.name for c in candidates(ST)]
    assert Candidate(0.0, 0.0, 0.0).name in names and Candidate(0.0, 1.0, 0.0).name in names
    assert len(names) == len(set(names)) == 2 * 3 * 2 + 2  # lam only varies below w = 1


@pytest.mark.parametrize("head_quality", ["noise", "truth"])
def test_choice_follows_the_held_out_folds(head_quality):
    X, Y = blobs(n=400, seed=1)
    rng = np.random.default_rng(2)
    labeled = np.zeros(len(X), bool)
    labeled[:120] = True
    held = np.arange(0, 120, 3)
    head = rng.random(Y.shape).astype(np.float32) if head_quality == "noise" else np.clip(Y + 0.01, 0, 1)
    targets = np.clip(Y * 0.8 + 0.1, 0, 1)
    best, vals = choose(X, Y, labeled, [(held, head, targets)], ST)
    assert vals[best.name] == max(vals.values())
    assert vals[best.name] >= vals[Candidate(0.0, 0.0, 0.0).name] and vals[best.name] >= vals["lam0_w1_a0"]
    if head_quality == "noise":
        assert best.w == 0.0
    else:
        assert best.w > 0.0 and vals[best.name] == pytest.approx(1.0)


def test_neighbour_vote_skips_the_image_itself():
    X, _ = blobs(n=50)
    sims, idx = neighbours(X, X, 5, self_pos=np.arange(50))
    assert idx.shape == (50, 5) and not (idx == np.arange(50)[:, None]).any()
    sims_t, idx_t = neighbours(X[:7], X[7:], 5)
    assert idx_t.shape == (7, 5) and (np.diff(sims_t, axis=1) <= 1e-6).all()


def test_exported_student_scores_match_the_fitted_student():
    from ssl_pipeline.model.multilabel import MultiLabelModel

    X, Y = blobs(n=120, D=16)
    X = X.astype(np.float16).astype(np.float32)  # the encode cache's precision, as the model keeps its references
    labeled = np.arange(120) < 40
    torch.manual_seed(0)
    head = AlignmentHead(16, np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32), np.array([0, 0, 1]),
                         hidden=8, dropout=0.0).eval()
    with torch.no_grad():
        H = torch.sigmoid(head(torch.from_numpy(X)[:, None])[0]).numpy()
    st = fit_student(Candidate(1.0, 0.5, 0.5), X, Y, labeled, np.clip(Y * 0.7 + 0.15, 0, 1), H, ST)
    spec = {"student": {"head_weight": 0.5, "knn_alpha": 0.5, "knn_k": st.k, "knn_power": st.power}}
    tensors = {"W": torch.from_numpy(st.W), "b": torch.from_numpy(st.b), "ref_emb": torch.from_numpy(st.ref_X),
               "ref_scores": torch.from_numpy(st.ref_S)}
    model = MultiLabelModel({"classes": ["a", "b", "c"], "task": "multilabel", "head": spec,
                             "thresholds": [0.5] * 3}, None, head, None, None, tensors).eval()
    q = X[:10] + 0.05 * np.random.default_rng(3).normal(size=(10, 16)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float16).astype(np.float32)
    with torch.no_grad():
        P = torch.sigmoid(model(torch.from_numpy(q))).numpy()
        Hq = torch.sigmoid(head(torch.from_numpy(q)[:, None])[0]).numpy()
    np.testing.assert_allclose(P, st.scores(q, Hq), atol=1e-5)
    assert macro_map(Y[:10], P) > 0.5


def test_student_settings_are_checked():
    with pytest.raises(ConfigError, match="multilabel.student.head_weights"):
        settings(make_config("data=multilabel_demo", "++multilabel.student.head_weights=[0.5,2.0]"))
    s = settings(make_config("data=multilabel_demo", "++multilabel.student.knn_alphas=0.3"))
    assert s["student"]["knn_alphas"] == [0.3] and DEFAULTS["student"]["knn_alphas"] == [0.0, 0.5]
