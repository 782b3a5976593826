"""The registry of views (:data:`VIEWS`), drawing one by name, and saving figures."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from matplotlib.figure import Figure

from ssl_pipeline.report.loading import RunArtifacts
from ssl_pipeline.report.maps import (
    EmbeddingMap,
    embedding_map,
    missing,
    plot_cluster_thumbnails,
    plot_map,
)
from ssl_pipeline.report.quality import class_table, plot_class_quality, plot_neighbours, plot_tiers, tier_table
from ssl_pipeline.report.scores import calibration_table, multilabel_table, plot_calibration, plot_multilabel

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ all views
@dataclass(frozen=True)
class View:
    """One figure of the report: what it needs (keys of :data:`REQUIREMENTS`) and how to draw it."""

    name: str
    title: str
    needs: tuple[str, ...]
    draw: Callable[[RunArtifacts, EmbeddingMap | None], Figure]
    uses_map: bool = False
    table: Callable[[RunArtifacts], list[dict]] | None = None
    caption: str = ""


VIEWS: list[View] = [
    View("map_clusters", "Embedding map by cluster", ("embeddings", "clusters"),
         lambda r, m: plot_map(r, m, "cluster"), uses_map=True,
         caption="k-means clusters of the cluster stage on a 2-D projection of the training embeddings."),
    View("map_labels", "Embedding map by pseudo-label", ("embeddings", "labels"),
         lambda r, m: plot_map(r, m, "label"), uses_map=True,
         caption="Pseudo-label of every shown point; stars mark the given labels."),
    View("map_correct", "Embedding map by correctness", ("embeddings", "labels", "truth"),
         lambda r, m: plot_map(r, m, "correct"), uses_map=True,
         caption="Green: pseudo-label matches the ground truth; red: it does not."),
    View("cluster_thumbnails", "Cluster thumbnails", ("clusters", "images"),
         lambda r, m: plot_cluster_thumbnails(r),
         caption="Random members of the largest clusters, captioned with their pseudo-labels."),
    View("class_quality", "Per-class pseudo-label quality", ("labels",), lambda r, m: plot_class_quality(r),
         table=class_table, caption="Precision, recall and coverage of the pseudo-labels per class."),
    View("least_confident", "Least confident pseudo-labels and their neighbours",
         ("labels", "knn", "images", "confidence"), lambda r, m: plot_neighbours(r, "least_confident"),
         caption="Each row: a sample, then its nearest neighbours in the cluster stage's kNN graph."),
    View("noise", "Samples flagged as noise and their neighbours", ("labels", "knn", "images", "noise_flags"),
         lambda r, m: plot_neighbours(r, "noise"),
         caption="Samples the labeler flagged as noisy, with their nearest neighbours."),
    View("tiers", "Pseudo-label tiers", ("labels", "tiers"), lambda r, m: plot_tiers(r), table=tier_table,
         caption="How many pseudo-labels each tier of the labeler holds, and how accurate each tier is."),
    View("calibration", "Confidence calibration", ("labels", "truth", "confidence"),
         lambda r, m: plot_calibration(r), table=calibration_table,
         caption="Accuracy per confidence bin: bars under the diagonal mean over-confidence."),
    View("multilabel", "Multi-label pseudo-label decisions", ("multilabel_decisions",),
         lambda r, m: plot_multilabel(r), table=multilabel_table,
         caption="Per label: positives decided by the class-aware thresholds, their precision and recall where "
                 "truth is known, the share of scores in the masked uncertain band, and context vetoes."),
]


class ViewResult(NamedTuple):
    """One drawn (or not drawn) view: ``figure`` is None when the view was ``skipped`` or ``error`` occurred."""

    view: View
    figure: Figure | None
    skipped: list[str]
    error: str | None = None


def views(run: RunArtifacts, emap: EmbeddingMap | Callable[[], EmbeddingMap] | None = None,
          on_error: str = "raise") -> Iterator[ViewResult]:
    """Draw every view of :data:`VIEWS` that applies to ``run``, in order.

    ``emap`` is an :class:`EmbeddingMap` or a callable computing one (called at
    most once, only if a map view applies; default :func:`embedding_map`).
    ``on_error="skip"`` logs a view that raises and yields it with ``error`` set
    instead of stopping.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    state: dict = {}

    def get_map() -> EmbeddingMap:
        if "map" not in state:
            try:
                state["map"] = emap if isinstance(emap, EmbeddingMap) else emap() if callable(emap) \
                    else embedding_map(run)
            except Exception as e:  # noqa: BLE001 - remembered so every map view reports the same failure
                state["map"] = e
        if isinstance(state["map"], Exception):
            raise state["map"]
        return state["map"]

    for v in VIEWS:
        why = missing(run, v.needs)
        if why:
            yield ViewResult(v, None, why)
            continue
        try:
            fig = v.draw(run, get_map() if v.uses_map else None)
        except Exception as e:
            if on_error == "raise":
                raise
            log.exception("report: view %s failed", v.name)
            yield ViewResult(v, None, [], f"{type(e).__name__}: {e}")
            continue
        yield ViewResult(v, fig, [])


def view(name: str) -> View:
    """The view of :data:`VIEWS` called ``name``."""
    for v in VIEWS:
        if v.name == name:
            return v
    raise KeyError(f"unknown view {name!r}; valid: {', '.join(v.name for v in VIEWS)}")


def draw_view(run: RunArtifacts, name: str, emap: EmbeddingMap | None = None, quiet: bool = False
              ) -> Figure | None:
    """Draw the view ``name`` (see :data:`VIEWS`), or print why it does not apply to ``run`` and return None.

    Map views use ``emap`` (computed with :func:`embedding_map` when not given).
    """
    v = view(name)
    why = missing(run, v.needs)
    if why:
        if not quiet:
            print(f"{v.title}: skipped, " + "; ".join(why))
        return None
    return v.draw(run, (emap if emap is not None else embedding_map(run)) if v.uses_map else None)


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes, rendered with the non-interactive Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> bytes:
    """Write the figure as a PNG (Agg) to ``path``; return the bytes written."""
    data = figure_png(fig, dpi)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return data
