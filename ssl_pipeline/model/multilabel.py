"""The multi-label model folder: image tower -> spatial tokens -> token PCA -> alignment head -> sigmoid.

Written by the multi-label retrain (:func:`export_multilabel`) next to the single-label layout of
:mod:`ssl_pipeline.model.export`::

    model.json          task multilabel, head kind ``alignment`` (in_dim, hidden, global_branch,
                        n_contexts, token_dim), backbone config, token input size, per-class thresholds
    head.safetensors    the alignment head's tensors (``head.*``: LayerNorm, projection, class embeddings,
                        context map, global branch), the token PCA ``token_pca_mean`` (d,) /
                        ``token_pca_W`` (d, d') when the run reduced its tokens, and the retrain's student
                        (``student.W`` (D, C), ``student.b`` (C,), ``student.ref_emb`` (n_ref, D) float16 pooled
                        embeddings of the training images, ``student.ref_scores`` (n_ref, C)) unless it chose
                        the head alone; ``model.json`` ``head.student`` holds its mix weights
    tower.safetensors   only for a tower without a loadable source (``backbone.pretrained: null``)

Decisions: class k is decided when its probability is at or above ``thresholds[k]``, the
class-aware cut of the training images (the ``pi_k`` share of them with the highest final
scores, ``pi_k`` the smoothed labeled frequency of k; :mod:`ssl_pipeline.multilabel.thresholds`).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssl_pipeline.errors import DataError
from ssl_pipeline.model.load import ExportedModel


class MultiLabelModel(ExportedModel):
    """An exported multi-label model; inputs (B, 3, S, S) squashed images, (B, P, d) tokens (a model without a
    student only) or (B, D) pooled embeddings (a model over an embeddings file: one token per image).
    ``forward`` gives (B, C) logits."""

    def __init__(self, config: dict, visual: nn.Module | None, head: nn.Module, transform,
                 pca: tuple[torch.Tensor, torch.Tensor] | None, student: dict[str, torch.Tensor] | None = None):
        super().__init__(config, visual, head, transform, None, None)
        self.has_pca = pca is not None
        if pca is not None:
            self.register_buffer("token_pca_mean", pca[0].float())
            self.register_buffer("token_pca_W", pca[1].float())
        attach_student(self, config["head"].get("student"), student)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 3, S, S) images -> ((B, P, d') head inputs, (B, D) pooled embeddings or None for token inputs),
        rounded to float16 as the encode cache stores them."""
        from ssl_pipeline.multilabel.features import extract

        pooled = None
        if x.ndim == 2:
            t, pooled = x[:, None, :].float(), x.float()
        elif x.ndim == 3:
            t = x.float()
        else:
            if self.visual is None:
                raise DataError("this model was exported from precomputed embeddings: give it (B, D) embeddings")
            t, pooled, _ = extract(types.SimpleNamespace(visual=self.visual), x)
        t = t.half().float()
        if self.has_pca:
            t = ((t - self.token_pca_mean) @ self.token_pca_W).half().float()
        return t, None if pooled is None else pooled.half().float()

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, P, d') head inputs (:meth:`encode`)."""
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, pooled = self.encode(x)
        logits = self.head(t)[0]
        if not self.has_student:
            return logits
        if pooled is None:
            raise DataError("this model mixes a pooled-embedding student: give it images or (B, D) embeddings, "
                            "not spatial tokens")
        return student_logits(self, pooled, torch.sigmoid(logits))


def attach_student(module: nn.Module, spec: dict | None, student: dict[str, torch.Tensor] | None) -> None:
    """Give ``module`` the retrain's student (``has_student``; mix weights from ``spec`` = ``model.json``'s
    ``head.student``; buffers ``student_W`` (D, C), ``student_b`` (C,), ``student_ref_scores`` (n_ref, C),
    ``student_ref_emb`` (n_ref, D) float16), or mark it as having none."""
    module.has_student = student is not None
    if student is None:
        return
    module.head_weight, module.knn_alpha = float(spec["head_weight"]), float(spec["knn_alpha"])
    module.knn_k, module.knn_power = int(spec["knn_k"]), float(spec["knn_power"])
    for k in ("W", "b", "ref_scores"):
        module.register_buffer(f"student_{k}", student[k].float())
    module.register_buffer("student_ref_emb", student["ref_emb"].half())


def student_logits(module: nn.Module, pooled: torch.Tensor, p_head: torch.Tensor) -> torch.Tensor:
    """(B, C) logits of the student of ``module`` (:func:`attach_student`) given pooled embeddings (B, D) and the
    head's probabilities (B, C): the mix with the linear member, then the neighbour vote
    (:class:`ssl_pipeline.multilabel.student.Student`)."""
    lin = torch.sigmoid(pooled @ module.student_W + module.student_b)
    s0 = module.head_weight * p_head + (1.0 - module.head_weight) * lin
    if module.knn_alpha > 0:
        sims, idx = (pooled @ module.student_ref_emb.float().T).topk(min(module.knn_k, len(module.student_ref_emb)),
                                                                      dim=1)
        w = sims.clamp_min(0) ** module.knn_power
        den = w.sum(1, keepdim=True)
        vote = torch.einsum("bk,bkc->bc", w, module.student_ref_scores[idx]) / den.clamp_min(1e-12)
        s0 = (1.0 - module.knn_alpha) * s0 + module.knn_alpha * torch.where(den > 0, vote, s0)
    s0 = s0.clamp(1e-7, 1 - 1e-7)
    return torch.log(s0) - torch.log1p(-s0)


def student_export(student) -> tuple[dict[str, torch.Tensor], dict]:
    """(``student.*`` tensors, ``model.json`` ``head.student`` spec) of a fitted
    :class:`~ssl_pipeline.multilabel.student.Student`."""
    tensors = {"student.W": torch.from_numpy(np.asarray(student.W, np.float32)),
               "student.b": torch.from_numpy(np.asarray(student.b, np.float32)),
               "student.ref_emb": torch.from_numpy(np.asarray(student.ref_X, np.float16)),
               "student.ref_scores": torch.from_numpy(np.asarray(student.ref_S, np.float32))}
    spec = {"linear_lambda": student.cand.lam, "head_weight": student.cand.w, "knn_alpha": student.cand.alpha,
            "knn_k": student.k, "knn_power": student.power, "n_reference": int(len(student.ref_X))}
    return tensors, spec


def student_tensors(path: Path, spec: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The ``student.*`` tensors of a model folder whose head has a ``student`` spec (None without one)."""
    if spec.get("student") is None:
        return None
    student = {k: tensors.get(f"student.{k}") for k in ("W", "b", "ref_emb", "ref_scores")}
    missing = [f"student.{k}" for k, v in student.items() if v is None]
    if missing:
        raise DataError(f"{path / 'head.safetensors'}: student tensors {', '.join(missing)} missing")
    return student


def export_multilabel(run_dir: Path, *, cfg, classes: list[str], head: nn.Module, head_spec: dict,
                      pca: tuple[np.ndarray, np.ndarray] | None, thresholds: np.ndarray, image_size: int | None,
                      metrics: dict, student=None) -> Path | None:
    """Write ``<run_dir>/model/`` for the multi-label head ``head`` (an AlignmentHead); rank 0 only.

    ``head_spec``: in_dim, hidden, global_branch, n_contexts; ``pca``: (mean (d,), W (d, d')) or None;
    ``thresholds`` (C,); ``image_size``: the squashed input size of the encode stage (None: embeddings);
    ``student``: the retrain's :class:`~ssl_pipeline.multilabel.student.Student` or None (the head alone).
    """
    from ssl_pipeline.model.export import _rank

    if _rank() != 0:
        return None
    state = {f"head.{k}": v for k, v in head.state_dict().items()}
    if pca is not None:
        state["token_pca_mean"] = torch.from_numpy(np.asarray(pca[0], np.float32))
        state["token_pca_W"] = torch.from_numpy(np.asarray(pca[1], np.float32))
    head_spec = dict(head_spec)
    if student is not None:
        tensors, head_spec["student"] = student_export(student)
        state.update(tensors)
    spec = dict(head_spec, kind="alignment", token_pca=pca is not None, embedding_dtype="float16")
    return write_multilabel_folder(run_dir, cfg=cfg, classes=classes, head_state=state, head=spec,
                                   thresholds=thresholds, image_size=image_size, metrics=metrics)


def write_multilabel_folder(run_dir: Path, *, cfg, classes: list[str], head_state: dict[str, torch.Tensor],
                            head: dict, thresholds: np.ndarray, image_size: int | None, metrics: dict) -> Path:
    """``<run_dir>/model/`` of any multi-label head (alignment head, dual encoder): the backbone config, its
    squashed-input preprocessing and, for a tower without a loadable source, its weights (image data; none for
    an embeddings file or ``image_size`` None), then :func:`~ssl_pipeline.model.export.export_model`."""
    from omegaconf import OmegaConf

    from ssl_pipeline.model.export import export_model

    embeddings_only = cfg.data.kind == "embeddings" or image_size is None
    bcfg = None if embeddings_only else OmegaConf.to_container(cfg.backbone, resolve=True)
    tower, pre = None, None
    if bcfg is not None:
        from ssl_pipeline.backbones import load_backbone
        from ssl_pipeline.multilabel.features import squash_transform

        backbone = load_backbone(cfg.backbone, device="cpu")
        pre = squash_transform(backbone, int(image_size))
        if bcfg.get("pretrained") in (None, "", "none"):
            tower = backbone.model.visual.state_dict()
    return export_model(Path(run_dir) / "model", classes=list(classes), head_state=head_state, head=head,
                        backbone_cfg=bcfg, preprocess=pre, image_size=image_size, tower_state=tower,
                        multilabel=True, thresholds=np.asarray(thresholds, np.float64), metrics=metrics,
                        extra={"mode": "multilabel", "preprocessing": {"squash": True}} if pre is not None
                        else {"mode": "multilabel"})


def load_multilabel(path: Path, doc: dict, tensors: dict[str, torch.Tensor], visual, transform) -> MultiLabelModel:
    """The :class:`MultiLabelModel` of a folder whose head kind is ``alignment`` (called by ``load_model``)."""
    from ssl_pipeline.multilabel.head import AlignmentHead

    spec = doc["head"]
    hs = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    for k in ("class_embed", "context_of"):
        if k not in hs:
            raise DataError(f"{path / 'head.safetensors'}: alignment head tensor head.{k} missing")
    head = AlignmentHead(int(spec["in_dim"]), hs["class_embed"].numpy(), hs["context_of"].numpy(),
                         hidden=int(spec["hidden"]), dropout=0.0, global_branch=bool(spec.get("global_branch", True)))
    try:
        head.load_state_dict(hs)
    except RuntimeError as e:
        raise DataError(f"{path / 'head.safetensors'}: does not fit the alignment head of model.json ({e})") from e
    pca = None
    if spec.get("token_pca"):
        if "token_pca_mean" not in tensors or "token_pca_W" not in tensors:
            raise DataError(f"{path / 'head.safetensors'}: token PCA tensors token_pca_mean / token_pca_W missing")
        pca = (tensors["token_pca_mean"], tensors["token_pca_W"])
    if doc.get("thresholds") is None or len(doc["thresholds"]) != len(doc["classes"]):
        raise DataError(f"{path / 'model.json'}: a multi-label model needs one threshold per class")
    return MultiLabelModel(doc, visual, head, transform, pca, student_tensors(path, spec, tensors))
