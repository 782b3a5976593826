"""The stage contract: every stage is one object with ``key(ctx)`` and ``run(ctx) -> StageResult``.

``pipeline.run`` builds a :class:`Context` and calls the stages of
:data:`ssl_pipeline.pipeline.REGISTRY` in order, up to ``cfg.stage``. A cached
stage subclasses :class:`CachedStage` and writes only :meth:`CachedStage.build`
(and, optionally, :meth:`CachedStage.export`, files for the run directory); the
cache check (key, path, complete?, forced?, stored metrics) is
:meth:`ssl_pipeline.artifacts.ArtifactCache.stage`, the same for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from ssl_pipeline.artifacts import ArtifactCache
from ssl_pipeline.data.table import SampleTable


@dataclass
class StageResult:
    """What a stage hands on: its artifact folder, its metrics (flat ``<stage>/<name>``) and its cache key."""

    path: Path | None
    metrics: dict
    key: str = ""


@dataclass
class Context:
    """Everything a stage reads: config, sample table, cache, run directory and the results so far."""

    cfg: DictConfig
    table: SampleTable
    cache: ArtifactCache
    run_dir: Path
    results: dict[str, StageResult] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)  # in-memory hand-overs between stages (the embedding store)

    def forced(self, stage: str) -> bool:
        f = self.cfg.get("force") or []
        if f == "all":
            return True
        f = [f] if isinstance(f, str) else list(f)
        return stage in f or "all" in f

    def path(self, stage: str) -> Path:
        return self.results[stage].path

    def key_of(self, stage: str) -> str:
        return self.results[stage].key


class Stage:
    """One step of the pipeline. Subclasses set ``name`` and implement :meth:`key` and :meth:`run`."""

    name: str = ""

    def key(self, ctx: Context) -> str:
        return ""

    def run(self, ctx: Context) -> StageResult:
        raise NotImplementedError


class CachedStage(Stage):
    """A stage whose artifact lives in the cache under ``<name>/<key(ctx)>/``.

    A stage whose :meth:`partial` is true builds into the resumable
    ``<key>.partial/`` folder (image encoding).
    """

    def partial(self, ctx: Context) -> bool:
        return False

    def check(self, ctx: Context) -> None:
        """Cheap validation before the cache is looked at (raise ConfigError / DataError)."""

    def build(self, ctx: Context, out: Path) -> dict:
        """Write the artifact into ``out``; return the stage metrics."""
        raise NotImplementedError

    def export(self, ctx: Context, result: StageResult) -> None:
        """Files for the run directory from a (new or reused) artifact."""

    def run(self, ctx: Context) -> StageResult:
        self.check(ctx)
        key = self.key(ctx)
        with ctx.cache.stage(self.name, key, ctx.forced(self.name), partial=self.partial(ctx)) as st:
            if not st.reused:
                st.metrics = self.build(ctx, st.dir)
        result = StageResult(st.path, st.metrics, key)
        self.export(ctx, result)
        return result


def write_run_files(ctx: Context) -> None:
    """``metrics.json``, ``artifacts.json`` (stage -> artifact folder) and ``config_resolved.yaml`` of the run."""
    from omegaconf import OmegaConf

    from ssl_pipeline.artifacts import write_json

    write_json(ctx.run_dir / "metrics.json", ctx.metrics)
    write_json(ctx.run_dir / "artifacts.json", {k: str(r.path) for k, r in ctx.results.items() if r.path})
    OmegaConf.save(ctx.cfg, ctx.run_dir / "config_resolved.yaml", resolve=True)
