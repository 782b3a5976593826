"""Stage 4, retrain, as a pipeline stage: the single-label recipes of :mod:`ssl_pipeline.stages.retrain` (head,
finetune) through their ``run(...)`` call, or the multi-label recipe (:mod:`ssl_pipeline.multilabel.recipe`).

Validation (single-label, ``retrain.mode=head``): for each fold folder the
pseudolabel stage wrote (``val/fold<f>/``: that fold's pseudo-labels, its
held-out labeled rows removed), the same head recipe is trained on the fold and
scored on the held-out rows: ``val/retrain_accuracy`` (also ``val/accuracy``).
With ``retrain.pseudo_targets=auto`` the head recipe already trained every candidate
on every fold to choose itself (:mod:`ssl_pipeline.retrain.recipes`); its
``val/retrain_accuracy`` is the chosen candidate's held-out accuracy (the best of
the candidates, so slightly optimistic) and no extra heads are trained here.
``retrain.mode=finetune`` is not refitted per fold (its cost is a whole
fine-tuning); its runs keep the pseudolabel stage's ``val/accuracy`` and say so in
``val/source``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from ssl_pipeline.stages.base import Context, Stage, StageResult

log = logging.getLogger(__name__)


class Retrain(Stage):
    """Stage 4: a model trained on labeled + pseudo-labeled rows, against the labeled-only baseline."""

    name = "retrain"

    def key(self, ctx: Context) -> str:
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.recipe import retrain_key_config

            return ctx.cache.key("retrain", retrain_key_config(ctx.cfg), ctx.key_of("pseudolabel"))
        from ssl_pipeline.stages.retrain import key_config

        return ctx.cache.key("retrain", key_config(ctx.cfg), ctx.key_of("pseudolabel"))

    def run(self, ctx: Context) -> StageResult:
        if ctx.table.multilabel:
            from ssl_pipeline.multilabel.recipe import build_retrain

            key = self.key(ctx)
            with ctx.cache.stage("retrain", key, ctx.forced("retrain")) as st:
                if not st.reused:
                    st.metrics = build_retrain(ctx, st.dir)
            from ssl_pipeline.multilabel.model_folder import export_model_folder

            export_model_folder(ctx, st.metrics, st.path)  # <run dir>/model/, also when the artifact is reused
            return StageResult(st.path, st.metrics, key)
        from ssl_pipeline.stages import retrain  # torch + Lightning: loaded only when a run retrains

        path, metrics, key = retrain.run(ctx.cfg, ctx.table, ctx.state["store"], ctx.path("pseudolabel"), ctx.cache,
                                         ctx.key_of("pseudolabel"), ctx.run_dir, force=ctx.forced("retrain"))
        metrics = dict(metrics)
        metrics.update(self.validate(ctx, retrain, metrics))
        return StageResult(path, metrics, key)

    def validate(self, ctx: Context, retrain, metrics: dict) -> dict:
        folds = sorted((ctx.path("pseudolabel") / "val").glob("fold*"))
        if not folds:
            return {}
        if metrics.get("retrain/recipe_source") == "validation":
            return {"val/accuracy": metrics["val/retrain_accuracy"], "val/source": "retrain"}
        if ctx.cfg.retrain.get("mode", "head") != "head":
            log.info("retrain: validation heads are trained for retrain.mode=head only; val/accuracy is the "
                     "pseudolabel stage's")
            return {"val/source": "pseudolabel"}
        correct = total = 0.0
        for fold in folds:
            held = np.load(fold / "heldout_rows.npy")
            split = np.asarray(ctx.table.split, dtype=object).copy()
            split[split == "test"] = "test_unused"  # the fold's head is scored on its held-out labeled rows only
            split[held] = "test"
            table = dataclasses.replace(ctx.table, split=split.astype(str))
            _, m, _ = retrain.run(ctx.cfg, table, ctx.state["store"], fold, ctx.cache,
                                  f"{ctx.key_of('pseudolabel')}:val:{fold.name}", Path(ctx.run_dir) / "val",
                                  force=ctx.forced("retrain"))
            if "retrain/test_accuracy" in m:
                correct += m["retrain/test_accuracy"] * m["retrain/n_test"]
                total += m["retrain/n_test"]
        if not total:
            return {}
        acc = correct / total
        log.info("retrain: validation head on %d held-out labeled rows: accuracy %.4f", int(total), acc)
        return {"val/accuracy": acc, "val/retrain_accuracy": acc, "val/source": "retrain"}


RETRAIN = Retrain()
