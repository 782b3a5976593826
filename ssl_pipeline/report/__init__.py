"""Views of a finished run: embedding maps, cluster thumbnails, per-class quality, tiers, calibration.

Everything here reads artifacts only (the run directory and the stage
folders named in its ``artifacts.json``) and reuses the package's loaders; it
holds no labeling logic of its own. Figures are plain
:class:`matplotlib.figure.Figure` objects, not pyplot-managed ones, so building
many of them in the report stage leaks nothing and needs no GUI backend; tables
are lists of dicts (no pandas).

Typical use (the notebook ``notebooks/inspect_clusters.ipynb`` does this)::

    from ssl_pipeline import report
    run = report.load_run("outputs/2024-01-01/12-00-00")
    emap = report.embedding_map(run)             # t-SNE of a seeded subsample
    report.plot_map(run, emap, color_by="cluster")
    report.plot_cluster_thumbnails(run)
    report.class_table(run)

Views that do not apply to a run (no pseudo-labels yet, no ground truth, no
images behind an embeddings file, a labeler without tiers or noise flags, a
multi-label run) are reported as skipped by :func:`missing`, keyed on what the
artifacts hold, instead of failing.

Modules: :mod:`.loading` (RunArtifacts, load_run), :mod:`.maps` (applicability, embedding map, thumbnails),
:mod:`.quality` (per-class, neighbours, tiers), :mod:`.scores` (multi-label, calibration, metrics),
:mod:`.views` (the view registry, figure saving).
"""

from ssl_pipeline.report.loading import (  # noqa: F401
    RunArtifacts,
    _as_bool,
    _classes_from_csv,
    _npy,
    from_artifacts,
    latest_run,
    load_run,
    multilabel_decisions,
    read_json,
    read_pseudolabels,
)
from ssl_pipeline.report.maps import (  # noqa: F401
    REQUIREMENTS,
    EmbeddingMap,
    _categorical_scatter,
    _colors,
    _map_axes,
    _mosaic,
    _require,
    _short,
    embedding_map,
    has_tiers,
    missing,
    plot_cluster_thumbnails,
    plot_map,
)
from ssl_pipeline.report.quality import (  # noqa: F401
    class_table,
    neighbour_table,
    plot_class_quality,
    plot_neighbours,
    plot_tiers,
    select_samples,
    tier_table,
)
from ssl_pipeline.report.scores import (  # noqa: F401
    calibration_table,
    expected_calibration_error,
    metrics_table,
    multilabel_table,
    plot_calibration,
    plot_multilabel,
)
from ssl_pipeline.report.views import (  # noqa: F401
    VIEWS,
    View,
    ViewResult,
    draw_view,
    figure_png,
    save_figure,
    view,
    views,
)
