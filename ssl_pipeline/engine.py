"""Lightning trainers from the ``trainer`` config group, quiet, and the DDP sections they run in.

Every Lightning use (the encode stage, the head retrain, fine-tuning, multi-label training, per-item
inference) builds its ``Trainer`` with :func:`make_trainer`, so ``trainer=ddp trainer.devices=2``
reaches all of them and no run prints Lightning's tips and accelerator banners.

Processes: with ``strategy=ddp`` Lightning starts the other ranks by running the same command
again (``python -m ssl_pipeline ...``); they redo the cheap, cached stages and meet rank 0 at the
first ``Trainer``. A DDP *section* (an encode, or the whole retrain stage) is a ``with
DDPSection():`` block: the re-launched ranks exit at its end (rank 0 alone writes artifacts and
metrics) and rank 0 closes the process group, so a later section starts fresh workers. DDP on CPU
uses gloo.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero",
                      "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                      "lightning.fabric.utilities.seed", "lightning.pytorch.utilities.seed")

# Lightning warnings about choices made here on purpose (no val loader, a custom batch sampler, few workers)
_EXPECTED_WARNINGS = (r".*validation_step.* but have no `val_dataloader`.*", r".*does not have many workers.*",
                      r".*custom batch sampler.*", r".*isinstance\(treespec, LeafSpec\).*",
                      r".*module\(s\) in eval mode.*", r".*`training_step` returned `None`.*",
                      r".*Consider setting `persistent_workers=True`.*", r".*LeafSpec.*")


def quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator banners, "💡 Tip" lines) out of the run's output.

    Lightning sets its loggers to INFO and gives them a console handler of their own when it is
    imported (so every line showed twice: once there, once through the run's handlers). Here they
    are set to WARNING and lose that handler: their warnings reach the run's console and log file once.
    Also filters the Lightning warnings about choices made on purpose here.
    """
    for name in _LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        lg.setLevel(logging.WARNING)
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                lg.removeHandler(h)
        lg.propagate = True
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def trainer_args(tcfg: DictConfig | dict | None) -> dict:
    """Accelerator, devices, strategy, precision and determinism of a ``trainer`` config (None: one CPU)."""
    if isinstance(tcfg, DictConfig):
        tcfg = OmegaConf.to_container(tcfg, resolve=True)
    t = dict(tcfg or {})
    return dict(accelerator=t.get("accelerator", "cpu"), devices=t.get("devices", 1),
                strategy=t.get("strategy", "auto"), precision=t.get("precision", "32-true"),
                deterministic=bool(t.get("deterministic", True)))


def make_trainer(tcfg: DictConfig | dict | None, **kw):
    """A quiet ``lightning.Trainer`` on the ``trainer`` config group; ``kw`` override or add Trainer arguments.

    ``use_distributed_sampler`` is off: the samplers here shard by rank themselves. No progress bar,
    no model summary, no tips or banners (:func:`quiet_lightning`).
    """
    import lightning as L

    quiet_lightning()
    args = trainer_args(tcfg)
    args.update(use_distributed_sampler=False, enable_progress_bar=False, enable_model_summary=False)
    args.update(kw)
    return L.Trainer(**args)


def is_relaunched_worker() -> bool:
    """True in a rank > 0 process that Lightning's script launcher started (not torchrun/SLURM)."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 and "TORCHELASTIC_RUN_ID" not in os.environ \
        and "SLURM_PROCID" not in os.environ


def rank() -> int:
    """This process's global rank (0 outside DDP)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


class DDPSection:
    """``with DDPSection(): ...`` around work that may create DDP trainers.

    On exit, a worker that Lightning re-launched for this section exits the process
    (``sys.exit(0)``); rank 0, if it launched them, closes the process group and forgets the
    launch environment so that the next section launches its own workers.
    """

    _ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

    def __enter__(self):
        self.launcher_here = "LOCAL_RANK" not in os.environ
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            return False
        if is_relaunched_worker():
            log.info("DDP worker (rank %s): section done, exiting", os.environ.get("LOCAL_RANK"))
            sys.exit(0)
        if self.launcher_here and "LOCAL_RANK" in os.environ:
            import torch

            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
            for k in self._ENV:
                os.environ.pop(k, None)
        return False


def wants_ddp(tcfg: DictConfig | dict | None) -> bool:
    """Whether a ``trainer`` config asks for more than one process (``devices`` other than 1, or a ddp strategy)."""
    if tcfg is None:
        return False
    devices = tcfg.get("devices", 1)
    many = not (isinstance(devices, int) and devices == 1) and str(devices) not in ("1", "[0]")
    return many or "ddp" in str(tcfg.get("strategy", "auto"))


def rank_slice(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice [start, stop) of n items for ``rank`` of ``world``."""
    per = math.ceil(n / world) if world else n
    return min(n, rank * per), min(n, (rank + 1) * per)


def check_trainer(tcfg: DictConfig | dict | None) -> None:
    """Refuse, before any work, a ``trainer`` config this machine cannot run (a GPU accelerator without CUDA)."""
    from ssl_pipeline.errors import ConfigError

    if tcfg is None:
        return
    acc = str(tcfg.get("accelerator", "cpu")).lower()
    if acc in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator", f"{acc} asked for (trainer=gpu?) but this machine has no CUDA "
                                                     "device; use trainer=cpu, or trainer=ddp trainer.accelerator=cpu")
    elif acc not in ("cpu", "auto", "mps", "tpu"):
        raise ConfigError("trainer.accelerator", f"unknown accelerator {acc!r}; valid: cpu, gpu, auto")
