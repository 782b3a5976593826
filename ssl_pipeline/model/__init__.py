"""The deployable model: ``export_model`` writes ``<run dir>/model/``, ``load_model`` reads it back (no pickle)."""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("load_model", "ExportedModel"):
        from ssl_pipeline.model import load

        return getattr(load, name)
    if name in ("export_model", "export_retrain"):
        from ssl_pipeline.model import export

        return getattr(export, name)
    raise AttributeError(name)


__all__ = ["ExportedModel", "export_model", "export_retrain", "load_model"]
