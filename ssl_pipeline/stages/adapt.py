"""Stage 1b, adapt: an optional projection of the frozen embeddings that cluster and pseudolabel see.

``adapt=none`` (default, ``_target_: null``): nothing runs, nothing is cached, and the cluster
stage keys on the encode stage exactly as before. ``adapt=simcse_pp``: the estimator
``hydra.utils.instantiate(cfg.adapt)`` (:class:`ssl_pipeline.adapt.SimCSEPPAdapter`) is fitted
on the embeddings of every training row (labeled and unlabeled, labels unused) and transforms
every row of the store. The artifact is an embedding store in the encode layout, so later stages
read it with :class:`ssl_pipeline.stage_io.EmbeddingStore`; it is handed on as
``ctx.state["label_store"]`` (cluster graph, labelers), while ``ctx.state["store"]`` (retrain,
model export) stays the encode stage's.

Artifact folder::

    shards/emb_00000.npy   (M, D) float16 adapted unit rows, store order
    shards/rows_00000.npy  (M,) int64 table rows (the encode store's)
    text_embeddings.npy    (C, D) float16 class-name embeddings through the same projection (when given)
    model.pt               the projection's state dict
    history.json           per-epoch loss terms; meta.json
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ssl_pipeline.artifacts import array_hash, atomic_save_npy, write_json
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.stage_io import EmbeddingStore, graph_rows, load_rows
from ssl_pipeline.stages.base import CachedStage, Context, StageResult

log = logging.getLogger(__name__)


def enabled(ctx: Context) -> bool:
    a = ctx.cfg.get("adapt")
    return a is not None and a.get("_target_") is not None


def _source_text(ctx: Context, store: EmbeddingStore) -> np.ndarray | None:
    text = store.text_embeddings()
    return text if text is not None else ctx.table.meta.get("text")


class Adapt(CachedStage):
    """Stage 1b: fit ``cfg.adapt`` (``_target_``) on the training rows' embeddings; the labelers see its output."""

    name = "adapt"

    def check(self, ctx: Context) -> None:
        if ctx.table.multilabel:
            raise ConfigError("adapt", "adapt=simcse_pp runs on single-label data only (multi-label data is "
                                       "labeled from spatial tokens); use adapt=none")

    def key(self, ctx: Context) -> str:
        pos = graph_rows(ctx.table, ctx.state["store"])
        return ctx.cache.key("adapt", {"cfg": OmegaConf.to_container(ctx.cfg.adapt, resolve=True),
                                       "rows": array_hash(pos)}, ctx.key_of("encode"))

    def run(self, ctx: Context) -> StageResult:
        if not enabled(ctx):
            ctx.state["label_store"] = ctx.state["store"]
            return StageResult(None, {})
        return super().run(ctx)

    def build(self, ctx: Context, out: Path) -> dict:
        store = ctx.state["store"]
        pos = graph_rows(ctx.table, store)
        if len(pos) < 2:
            raise ConfigError("adapt", f"needs at least 2 training rows with an embedding, got {len(pos)}")
        try:
            adapter = instantiate(ctx.cfg.adapt)
            adapter.fit(np.asarray(load_rows(store, pos), np.float32))
        except (TypeError, ValueError) as e:
            raise ConfigError("adapt", f"{ctx.cfg.adapt.get('_target_')}: {e}") from e
        M = store.matrix()  # float16 memory map: transformed in blocks, no float32 copy of every row
        Z = np.empty(M.shape, np.float16)
        for s in range(0, len(M), 65536):
            Z[s:s + 65536] = adapter.transform(np.asarray(M[s:s + 65536], np.float32))
        (out / "shards").mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out / "shards" / "emb_00000.npy", Z)
        atomic_save_npy(out / "shards" / "rows_00000.npy", store.rows)
        text = _source_text(ctx, store)
        if text is not None:
            atomic_save_npy(out / "text_embeddings.npy",
                            adapter.transform(np.asarray(text, np.float32)).astype(np.float16))
        if hasattr(adapter, "model_"):
            import torch

            torch.save(adapter.model_.state_dict(), out / "model.pt")
        history = list(getattr(adapter, "history_", []))
        write_json(out / "history.json", history)
        write_json(out / "meta.json", {"source": str(store.path), "adapter": type(adapter).__name__,
                                       "n_fit_rows": int(len(pos)), "dim": int(Z.shape[1])})
        # how far the labelers' space moved: mean cosine between each row and its adapted row
        X = np.asarray(M[: min(len(Z), 20000)], np.float32)
        X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        moved = (X * np.asarray(Z[: len(X)], np.float32)).sum(1).mean()
        metrics = {"adapt/n_fit_rows": int(len(pos)), "adapt/seconds": round(float(getattr(adapter, "seconds_", 0)), 2),
                   "adapt/mean_cos_to_input": round(float(moved), 4)}
        if history:
            metrics["adapt/loss_first"] = round(history[0]["loss"], 4)
            metrics["adapt/loss_last"] = round(history[-1]["loss"], 4)
        return metrics

    def export(self, ctx: Context, result: StageResult) -> None:
        ctx.state["label_store"] = EmbeddingStore(result.path)
