"""Stage 5, report: every view of :mod:`ssl_pipeline.report` as PNGs plus one self-contained HTML page.

Output, in the run directory (not the artifact cache: a report is cheap and
belongs to its run)::

    report/<nn>_<view>.png   one figure per view that applies to the run
    report.html              the figures (base64 data URIs), the metrics, the per-class,
                             tier and calibration tables; no external links or files

Optional config keys (defaults in brackets): ``report.method`` (tsne | pca)
[tsne], ``report.max_points`` [3000], ``report.tsne_iter`` [500],
``report.threads`` (OpenMP threads for t-SNE; null = all) [1], ``report.dpi``
[100], ``report.seed`` [``seed``].

For an existing run directory: ``python -m ssl_pipeline.stages.report RUN_DIR``.
"""

from __future__ import annotations

import base64
import html
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import atomic_write_bytes, atomic_write_text
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.stages.base import Context, Stage, StageResult, write_run_files

if TYPE_CHECKING:  # the views (matplotlib) are imported where a report is drawn, not at the pipeline's start-up
    from ssl_pipeline import report as views_lib

log = logging.getLogger(__name__)

DEFAULTS = {"method": "tsne", "max_points": 3000, "tsne_iter": 500, "threads": 1, "dpi": 100, "seed": None}

CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #8a5a00; } .caption { color: #555; } nav a { margin-right: 1em; }
"""


def options(cfg: DictConfig | None) -> dict:
    """The report settings: ``cfg.report.*`` over :data:`DEFAULTS` (seed defaults to ``cfg.seed``)."""
    opts = dict(DEFAULTS)
    if cfg is not None:
        for k in DEFAULTS:
            v = OmegaConf.select(cfg, f"report.{k}", default=None)
            if v is not None:
                opts[k] = v
        if opts["seed"] is None:
            opts["seed"] = OmegaConf.select(cfg, "seed", default=0)
    opts["seed"] = int(opts["seed"] or 0)
    return opts


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def html_table(rows: list[dict]) -> str:
    """A list of dicts (same keys) as an HTML table."""
    if not rows:
        return "<p>(empty)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(run: views_lib.RunArtifacts, run_dir: str | Path, opts: dict | None = None) -> dict:
    """Draw every applicable view of ``run``; write ``report/*.png`` and ``report.html`` under ``run_dir``."""
    from ssl_pipeline import report as views_lib

    t0 = time.perf_counter()
    opts = {**DEFAULTS, **(opts or {})}
    run_dir = Path(run_dir)
    out = run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a re-run must not leave stale views beside the new ones
        old.unlink()

    def compute_map() -> views_lib.EmbeddingMap:
        t = time.perf_counter()
        m = views_lib.embedding_map(run, method=opts["method"], max_points=int(opts["max_points"]),
                                    seed=int(opts["seed"] or 0), max_iter=int(opts["tsne_iter"]),
                                    n_threads=opts["threads"])
        log.info("report: %s map of %d points in %.1fs", m.method, len(m.pos), time.perf_counter() - t)
        return m

    sections, skipped, failed = [], [], []
    n = 0
    for res in views_lib.views(run, compute_map, on_error="skip"):
        v = res.view
        if res.figure is None:
            (failed if res.error else skipped).append((v, res.error or "; ".join(res.skipped)))
            continue
        n += 1
        png = views_lib.figure_png(res.figure, dpi=int(opts["dpi"]))
        atomic_write_bytes(out / f"{n:02d}_{v.name}.png", png)
        table = ""
        if v.table is not None:
            try:
                table = html_table(v.table(run))
            except Exception as e:  # noqa: BLE001 - a table that fails must not cost the figure
                log.exception("report: table of %s failed", v.name)
                table = f"<p class='note'>table failed: {html.escape(str(e))}</p>"
        sections.append((v.name,
            f"<section id='{v.name}'><h2>{html.escape(v.title)}</h2><p class='caption'>{html.escape(v.caption)}</p>"
            f"<img alt='{html.escape(v.title)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"{table}</section>"))
    seconds = time.perf_counter() - t0
    metrics = {"report/n_figures": n, "report/n_skipped": len(skipped), "report/n_failed": len(failed),
               "report/seconds": round(seconds, 2)}
    atomic_write_text(run_dir / "report.html", _page(run, run_dir, sections, skipped, failed, seconds))
    log.info("report: %d figures, %d views skipped, %d failed, in %.1fs -> %s", n, len(skipped), len(failed),
             seconds, run_dir / "report.html")
    return metrics


def _page(run: views_lib.RunArtifacts, run_dir: Path, sections: list[tuple[str, str]], skipped: list, failed: list,
          seconds: float) -> str:
    from ssl_pipeline import report as views_lib

    esc = html.escape
    data = ""
    if run.cfg is not None:
        data = OmegaConf.select(run.cfg, "data.name", default=None) or OmegaConf.select(run.cfg, "data.kind",
                                                                                       default="")
    labeler = run.labeler.get("name") or run.labeler.get("class") or "–"
    n_lab = int(run.labeled.sum()) if run.labeled is not None else 0
    summary = (f"<p>Run <code>{esc(str(run_dir))}</code>; data <b>{esc(str(data))}</b>, labeler <b>{esc(labeler)}</b>; "
               f"{len(run)} training points ({n_lab} with given labels), {len(run.classes)} classes. "
               f"Report drawn in {seconds:.1f}s.</p>")
    notes = "".join(f"<p class='note'>{esc(n)}</p>" for n in run.notes)
    nav = "<nav>" + "".join(f"<a href='#{name}'>{name}</a>" for name, _ in sections) + \
        "<a href='#metrics'>metrics</a></nav>"
    metrics = f"<section id='metrics'><h2>Metrics</h2>{html_table(views_lib.metrics_table(run))}</section>"
    rest = ""
    if skipped:
        rest += "<h2>Views that do not apply to this run</h2><ul>" + "".join(
            f"<li><b>{esc(v.title)}</b>: {esc(why)}</li>" for v, why in skipped) + "</ul>"
    if failed:
        rest += "<h2>Views that failed</h2><ul>" + "".join(
            f"<li class='note'><b>{esc(v.title)}</b>: {esc(why)}</li>" for v, why in failed) + "</ul>"
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>ssl_pipeline report</title>"
            f"<style>{CSS}</style></head><body><h1>ssl_pipeline report</h1>{summary}{notes}{nav}"
            + "".join(body for _, body in sections) + metrics + rest + "</body></html>\n")


def run(cfg: DictConfig, table: SampleTable, run_dir: Path, artifacts: dict, metrics: dict | None = None) -> dict:
    """Write ``<run_dir>/report/*.png`` and ``<run_dir>/report.html``; return ``report/*`` metrics.

    ``artifacts`` maps stage name -> artifact folder (as in ``artifacts.json``);
    ``metrics`` are the run's metrics so far (``metrics.json`` in ``run_dir`` is
    read when they are not given).
    """
    from ssl_pipeline import report as views_lib

    run_dir = Path(run_dir)
    if metrics is None:
        metrics = views_lib.read_json(run_dir / "metrics.json")
    art = views_lib.from_artifacts(artifacts, table=table, cfg=cfg, metrics=metrics, run_dir=run_dir,
                                   pseudolabels=views_lib.read_pseudolabels(run_dir / "pseudolabels.csv"))
    for n in art.notes:
        log.warning("report: %s", n)
    return write_report(art, run_dir, options(cfg))


def main(argv: list[str] | None = None) -> int:
    """``python -m ssl_pipeline.stages.report RUN_DIR``: (re)draw the report of a finished run."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ssl_pipeline.stages.report RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from ssl_pipeline import report as views_lib

    art = views_lib.load_run(argv[0])
    m = write_report(art, argv[0], options(art.cfg))
    print(f"{m['report/n_figures']} figures -> {Path(argv[0]) / 'report.html'} ({m['report/seconds']}s)")
    return 0



class Report(Stage):
    """Stage 5: figures and ``report.html`` from the run's files (not cached: it is cheap and reads the run)."""

    name = "report"

    def run(self, ctx: Context) -> StageResult:
        write_run_files(ctx)  # the report reads metrics.json / artifacts.json of the run so far
        # multi-label runs: the report draws the per-label decisions from the run directory's exports
        artifacts = {} if ctx.table.multilabel else {k: str(r.path) for k, r in ctx.results.items() if r.path}
        return StageResult(None, run(ctx.cfg, ctx.table, ctx.run_dir, artifacts, ctx.metrics))


REPORT = Report()


if __name__ == "__main__":
    sys.exit(main())
