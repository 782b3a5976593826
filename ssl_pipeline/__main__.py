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
    """The root config folder: ``conf/`` beside the package (source checkout / editable install)."""
    for candidate in (Path(__file__).resolve().parent.parent / "conf", Path(__file__).resolve().parent / "conf"):
        if (candidate / "config.yaml").exists():
            return str(candidate)
    raise SystemExit("ssl_pipeline: cannot find conf/config.yaml; install the package from its source checkout "
                     "(pip install -e .)")


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
