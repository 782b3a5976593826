"""A multi-label run's trained student in the retrain artifact and the run directory's ``model/`` folder.

:func:`save_student` / :func:`load_student`: the fitted student's arrays (``student.npz``) and candidate
(``student.json``); :func:`export_model_folder`: ``<run dir>/model/`` (the alignment head, its token PCA, the
student, per-class thresholds), or the dual encoder for ``loss=unidec`` / ``psl``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_pipeline.artifacts import write_json
from ssl_pipeline.multilabel.features import features_of
from ssl_pipeline.multilabel.labeler import CSALabeler
from ssl_pipeline.multilabel.settings import settings
from ssl_pipeline.multilabel.train import predict
from ssl_pipeline.stage_io import read_arrays


def save_student(student, out: Path) -> None:
    """The fitted student's arrays (``student.npz``) and candidate (``student.json``) in the retrain artifact."""
    np.savez(out / "student.npz", W=student.W, b=student.b, ref_X=student.ref_X.astype(np.float16),
             ref_S=student.ref_S)
    write_json(out / "student.json", {"lam": student.cand.lam, "w": student.cand.w, "alpha": student.cand.alpha,
                                      "k": student.k, "power": student.power})


def load_student(folder: Path):
    """The :class:`~ssl_pipeline.multilabel.student.Student` of :func:`save_student`."""
    import json

    from ssl_pipeline.multilabel.student import Candidate, Student

    a, j = np.load(folder / "student.npz"), json.loads((folder / "student.json").read_text())
    return Student(Candidate(j["lam"], j["w"], j["alpha"]), a["W"], a["b"], a["ref_X"].astype(np.float32),
                   a["ref_S"], int(j["k"]), float(j["power"]))


def export_model_folder(ctx, metrics: dict, retrain_dir: Path) -> None:
    """``<run dir>/model/`` of a multi-label retrain: the semi-supervised alignment head (the pseudolabel stage's
    teacher), its token PCA, the retrain's student (linear member, mix, neighbour references) unless it chose the
    head alone, and per-class thresholds, the class-aware cut of the final scores on the training images (each
    without its own neighbour vote; :func:`~ssl_pipeline.multilabel.thresholds.class_aware_pseudolabels` with the
    labeled frequencies, no band).
    ``loss=unidec`` / ``psl``: the semi-supervised dual encoder of the retrain artifact ``retrain_dir``
    (:func:`ssl_pipeline.model.dual_encoder.export_dual_encoder`)."""

    from ssl_pipeline.model.multilabel import export_multilabel
    from ssl_pipeline.multilabel.thresholds import class_aware_pseudolabels, class_frequencies
    from ssl_pipeline.retrain.options import multilabel_loss

    cfg, table = ctx.cfg, ctx.table
    if multilabel_loss(cfg) is not None:
        from ssl_pipeline.model.dual_encoder import export_dual_encoder

        export_dual_encoder(ctx, metrics, retrain_dir)
        return
    s, seed = settings(cfg), int(cfg.seed)
    pl_dir = ctx.path("pseudolabel")
    semi = CSALabeler.load(pl_dir, s, seed)
    feats = features_of(ctx.path("encode"), table)
    arr = read_arrays(pl_dir, ("rows", "labeled"))
    rows, labeled = arr["rows"], arr["labeled"].astype(bool)
    pos = np.full(len(table), -1, np.int64)
    pos[feats.rows] = np.arange(len(feats.rows))
    Y = np.asarray(table.y_true).astype(np.int8)
    S, _ = predict(semi.head_, semi.transform(feats.tokens[pos[rows]]))
    student = load_student(Path(retrain_dir))
    if student.cand.w < 1.0 or student.cand.alpha > 0:  # each training image's score without its own vote
        S = student.scores(feats.pooled[pos[rows]], S, self_pos=np.arange(len(rows)))
    else:
        student = None
    pi = class_frequencies(Y[rows[labeled]], float(s["pseudo"]["prior_strength"]))
    tau = class_aware_pseudolabels(S, pi, 0.0)[0]
    # the image at the cut stays positive under the model's float32 arithmetic (the student's scores here are
    # numpy's, the model's torch's: they differ by ~1e-7)
    tau = np.where(np.isfinite(tau), tau - (1e-6 if student is not None else 0.0), 1.0)
    size = encode_image_size(ctx)
    spec = {"in_dim": int(semi.dim_), "hidden": int(s["hidden"]), "global_branch": bool(s["global_branch"]),
            "n_contexts": int(np.max(semi.context_of_)) + 1}
    export_multilabel(ctx.run_dir, cfg=cfg, classes=list(table.classes), head=semi.head_, head_spec=spec,
                      pca=semi.pca_, thresholds=tau, image_size=size, metrics=metrics, student=student)


def encode_image_size(ctx) -> int | None:
    """The squashed input size the encode stage ran the tower at (its ``meta.json``); None for an embeddings file."""
    import json

    meta = ctx.path("encode") / "meta.json"
    if ctx.table.meta.get("embeddings_only") or not meta.exists():
        return None
    return json.loads(meta.read_text()).get("image_size")
