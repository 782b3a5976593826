"""Command line: ``python -m ssl_pipeline [stage=...] [data=...] [overrides]`` (Hydra)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ssl_pipeline.errors import PipelineError

log = logging.getLogger("ssl_pipeline")


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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from ssl_pipeline.pipeline import run

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    except PipelineError as e:
        log.error("%s", e)
        print(f"ssl_pipeline error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    for k in ("retrain/test_accuracy", "retrain/test_map", "pseudolabel/accuracy"):
        if k in metrics:
            return float(metrics[k])
    return None


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
