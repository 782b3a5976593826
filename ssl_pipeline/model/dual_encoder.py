"""The model folder of a ``loss=unidec`` / ``loss=psl`` multi-label retrain: pooled embedding -> dual encoder.

Written by :func:`export_dual_encoder` (called by the multi-label retrain stage) in the layout of
:mod:`ssl_pipeline.model.export`::

    model.json          task multilabel, head kind ``dual_encoder`` (in_dim, n_classes, hidden, clf_cosine,
                        tau_de, tau_clf, use_clf, platt [a, b], loss), backbone config and squashed input
                        size (image data) or input ``embeddings``, per-class thresholds, the run's metrics
    head.safetensors    the dual encoder's tensors (``head.*``: residual MLP, DE and classifier projections,
                        label table ``E``, classifier rows ``W``)
    tower.safetensors   only for a tower without a loadable source (``backbone.pretrained: null``)

Scores: ``s = cos(q, E) / tau_de (+ cos(h, W) / tau_clf with the classifier)``, each term centred over the
labels (:func:`ssl_pipeline.multilabel.unidec.scores`), the retrain's test scores.
They rank labels but are not probabilities (PSL is a softmax over a label pool), so the probability of label
k is ``sigmoid(a s_k + b)``, one (a, b) for all labels fitted by logistic regression on the labeled training
images (Platt scaling; monotone, so the ranking and the macro mAP are the run's). Decisions: label k at or
above ``thresholds[k]``, the class-aware cut of the training images' probabilities (the ``pi_k`` share of
them, ``pi_k`` the smoothed labeled frequency of k; :mod:`ssl_pipeline.multilabel.thresholds`), as for the
alignment head (:mod:`ssl_pipeline.model.multilabel`). When the retrain's student mixed more than the dual
encoder alone (``head.student`` in ``model.json``, ``student.*`` tensors), the probabilities are the student's
over those Platt-scaled ones (:func:`ssl_pipeline.model.multilabel.student_logits`), as in the run.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_pipeline.errors import DataError
from ssl_pipeline.model.load import ExportedModel

log = logging.getLogger(__name__)

KIND = "dual_encoder"


class DualEncoderModel(ExportedModel):
    """An exported dual encoder; inputs (B, 3, S, S) squashed images or (B, D) pooled embeddings.

    ``forward`` gives (B, C) logits ``a s + b`` (``s``: the dual encoder's scores), so ``predict_proba`` is
    their sigmoid.
    """

    def __init__(self, config: dict, visual: nn.Module | None, encoder: nn.Module, transform,
                 student: dict[str, torch.Tensor] | None = None):
        from ssl_pipeline.model.multilabel import attach_student

        super().__init__(config, visual, encoder, transform, None, None)
        spec = config["head"]
        self.tau_de, self.tau_clf = float(spec["tau_de"]), float(spec["tau_clf"])
        self.use_clf = bool(spec["use_clf"])
        self.platt = tuple(float(v) for v in spec["platt"])
        attach_student(self, spec.get("student"), student)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images or (B, D) embeddings -> (B, D) pooled embeddings at the cache's float16 precision."""
        from ssl_pipeline.multilabel.features import extract

        if x.ndim == 2:
            p = x.float()
        else:
            if self.visual is None:
                raise DataError("this model was exported from precomputed embeddings: give it (B, D) embeddings")
            p = extract(types.SimpleNamespace(visual=self.visual), x)[1]
        return p.half().float()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) dual-encoder scores (the retrain's ``test_scores`` for the same inputs)."""
        return self._scores(*self.head(self.pooled(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ssl_pipeline.model.multilabel import student_logits

        a, b = self.platt
        if not self.has_student:
            return a * self.scores(x) + b
        pooled = self.pooled(x)
        q, h = self.head(pooled)
        return student_logits(self, pooled, torch.sigmoid(a * self._scores(q, h) + b))

    def _scores(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        s = q @ self.head.label_de().T / self.tau_de
        s = s - s.mean(1, keepdim=True)  # each head's scores centred over the labels, as the retrain scores them
        if self.use_clf:
            c = h @ self.head.label_clf().T / self.tau_clf
            s = s + (c - c.mean(1, keepdim=True))
        return s


def platt_fit(S: np.ndarray, Y: np.ndarray) -> tuple[float, float]:
    """(a, b) of ``sigmoid(a s + b)`` by logistic regression of every (image, label) entry: S, Y (n, C)."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(Y).reshape(-1).astype(int)
    if y.min() == y.max():
        return 1.0, 0.0
    lr = LogisticRegression(C=1.0, max_iter=200).fit(np.asarray(S, np.float64).reshape(-1, 1), y)
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def platt_probabilities(S: np.ndarray, a: float, b: float) -> np.ndarray:
    """``sigmoid(a S + b)`` (float32, same shape as the scores S), computed in float64."""
    return (1.0 / (1.0 + np.exp(-np.clip(a * np.asarray(S, np.float64) + b, -60, 60)))).astype(np.float32)


def export_dual_encoder(ctx, metrics: dict, stage_dir: Path) -> Path | None:
    """``<run dir>/model/`` of a ``loss=unidec`` / ``psl`` retrain from its artifact ``stage_dir``.

    ``stage_dir/dual_encoder.pt`` (a state dict of plain tensors, read with ``weights_only=True``) is the
    semi-supervised dual encoder; the encode stage's pooled embeddings of the training rows give the Platt
    fit (labeled rows) and the class-aware thresholds (all training rows).
    """
    from ssl_pipeline.model.export import _rank
    from ssl_pipeline.model.multilabel import student_export, write_multilabel_folder
    from ssl_pipeline.multilabel.features import features_of
    from ssl_pipeline.multilabel.model_folder import encode_image_size, load_student
    from ssl_pipeline.multilabel.settings import settings
    from ssl_pipeline.multilabel.thresholds import class_aware_pseudolabels, class_frequencies
    from ssl_pipeline.multilabel.unidec import DualEncoder, loss_settings
    from ssl_pipeline.stage_io import read_arrays

    if _rank() != 0:
        return None
    cfg, table = ctx.cfg, ctx.table
    name, kwargs, s = loss_settings(cfg)
    sd = torch.load(Path(stage_dir) / "dual_encoder.pt", map_location="cpu", weights_only=True)
    C, D = sd["E"].shape
    enc = DualEncoder(np.zeros((C, D), np.float32), int(s["hidden"]), 0.0, 1.0, bool(s["clf_cosine"]))
    enc.load_state_dict(sd)
    enc.eval()
    spec = {"kind": KIND, "in_dim": int(D), "n_classes": int(C), "hidden": int(s["hidden"]),
            "clf_cosine": bool(s["clf_cosine"]), "tau_de": float(kwargs.get("tau_de", kwargs.get("tau", 0.05))),
            "tau_clf": float(kwargs.get("tau_clf", 1.0)),
            "use_clf": name == "unidec" and float(kwargs.get("lam", 1.0)) > 0, "loss": name,
            "embedding_dtype": "float16", "platt": [1.0, 0.0]}
    model = DualEncoderModel({"classes": list(table.classes), "task": "multilabel", "head": spec,
                              "thresholds": None}, None, enc, None)
    feats = features_of(ctx.path("encode"), table)
    arr = read_arrays(ctx.path("pseudolabel"), ("rows", "labeled"))
    rows, labeled = arr["rows"], arr["labeled"].astype(bool)
    pos = np.full(len(table), -1, np.int64)
    pos[feats.rows] = np.arange(len(feats.rows))
    Y = np.asarray(table.y_true).astype(np.int8)
    Xr = np.asarray(feats.pooled[pos[rows]], np.float32)
    with torch.no_grad():
        S = model.scores(torch.from_numpy(Xr)).numpy()
    pf = Path(stage_dir) / "platt.json"
    if pf.exists():  # the retrain's own fit (the scale its student mixed)
        d = json.loads(pf.read_text())
        a, b = float(d["a"]), float(d["b"])
    else:
        a, b = platt_fit(S[labeled], Y[rows[labeled]])
    spec["platt"] = [a, b]
    P = platt_probabilities(S, a, b)
    student = load_student(Path(stage_dir)) if (Path(stage_dir) / "student.npz").exists() else None
    state_extra = {}
    if student is not None and (student.cand.w < 1.0 or student.cand.alpha > 0):
        P = student.scores(Xr, P, self_pos=np.arange(len(rows)))  # each training image without its own vote
        state_extra, spec["student"] = student_export(student)
    else:
        student = None
    pi = class_frequencies(Y[rows[labeled]], float(settings(cfg)["pseudo"]["prior_strength"]))
    tau = class_aware_pseudolabels(P, pi, 0.0)[0]
    # the image at the cut stays positive under the model's float32 torch arithmetic
    tau = np.where(np.isfinite(tau), tau - (1e-6 if student is not None else 0.0), 1.0)
    state = {f"head.{k}": v for k, v in enc.state_dict().items()}
    state.update(state_extra)
    return write_multilabel_folder(ctx.run_dir, cfg=cfg, classes=list(table.classes), head_state=state, head=spec,
                                   thresholds=tau, image_size=encode_image_size(ctx), metrics=metrics)


def load_dual_encoder(path: Path, doc: dict, tensors: dict[str, torch.Tensor], visual, transform) -> DualEncoderModel:
    """The :class:`DualEncoderModel` of a folder whose head kind is ``dual_encoder`` (called by ``load_model``)."""
    from ssl_pipeline.multilabel.unidec import DualEncoder

    spec = doc["head"]
    for k in ("in_dim", "n_classes", "hidden", "clf_cosine", "tau_de", "tau_clf", "use_clf", "platt"):
        if k not in spec:
            raise DataError(f"{path / 'model.json'}: dual_encoder head field {k!r} missing")
    C, D = int(spec["n_classes"]), int(spec["in_dim"])
    if C != len(doc["classes"]):
        raise DataError(f"{path / 'model.json'}: head has {C} labels, classes lists {len(doc['classes'])}")
    enc = DualEncoder(np.zeros((C, D), np.float32), int(spec["hidden"]), 0.0, 1.0, bool(spec["clf_cosine"]))
    hs = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    try:
        enc.load_state_dict(hs)
    except RuntimeError as e:
        raise DataError(f"{path / 'head.safetensors'}: does not fit the dual encoder of model.json "
                        f"({str(e)[:200]})") from e
    if doc.get("thresholds") is None or len(doc["thresholds"]) != C:
        raise DataError(f"{path / 'model.json'}: a multi-label model needs one threshold per class")
    from ssl_pipeline.model.multilabel import student_tensors

    return DualEncoderModel(doc, visual, enc, transform, student_tensors(path, spec, tensors))
