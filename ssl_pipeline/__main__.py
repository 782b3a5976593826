"""Command line: ``python -m ssl_pipeline [stage=...] [data=...] [overrides]`` (Hydra)."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_pipeline.errors import PipelineError


def config_dir() -> str:
    """The root config folder: ``ssl_pipeline/conf`` inside an installed wheel, else ``conf/`` of the checkout.

    The configs' source is ``conf/`` at the repository root; the wheel build copies it into the package
    (``setup.py``), so a non-editable install runs from any folder.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").exists():
            return str(candidate)
    raise SystemExit("ssl_pipeline: cannot find its configs (conf/config.yaml) inside the package or beside it; "
                     "reinstall it (pip install .)")


def _log_file() -> Path | None:
    """The run's log file (Hydra's job log), where the full traceback of an error goes."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            return Path(h.baseFilename)
    return None


def _trace_to_log_file(message: str) -> Path | None:
    """Write ``message`` and the current traceback to the run's log file only (not the terminal)."""
    f = _log_file()
    if f is not None:
        with f.open("a") as fh:
            fh.write(f"ERROR {message}\n{traceback.format_exc()}\n")
    return f


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from ssl_pipeline.pipeline import objective, run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    except PipelineError as e:  # bad input: one line naming the key or file, the trace in the run's log file
        _trace_to_log_file(str(e))
        print(f"ssl_pipeline error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:  # a bug or an unexpected failure: one line, the full traceback in the log file
        f = _trace_to_log_file(f"{type(e).__name__}: {e}")
        where = f" (traceback in {f})" if f else ""
        print(f"ssl_pipeline: unexpected {type(e).__name__}: {e}{where}", file=sys.stderr, flush=True)
        sys.exit(1)
    return objective(cfg, metrics)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
