"""Where an interrupted fine-tuning run continues from (``retrain.resume``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ssl_pipeline.engine import rank as _rank
from ssl_pipeline.errors import ConfigError


class ResumePlan:
    """Where an interrupted finetune run is continued from (decided before any process is started).

    ``retrain.resume``: false (start over: this run directory's old phases are removed), true
    (this run directory), a run directory, a ``retrain/`` folder, or a ``.ckpt`` file
    (``<run>/retrain/<phase>/checkpoints/x.ckpt``: that phase continues from that checkpoint).
    """

    def __init__(self, resume, root: Path, key: str):
        self.root, self.key, self.src, self.explicit = root, key, None, {}
        flag = str(resume).strip().lower() if resume is not None else "false"
        if flag in ("false", "none", "null", "", "0", "no"):
            if root.exists() and _rank() == 0:
                for d in root.iterdir():
                    if d.is_dir():
                        shutil.rmtree(d, ignore_errors=True)
        elif flag in ("true", "1", "yes"):
            self.src = root
        else:
            p = Path(str(resume)).expanduser().resolve()
            if p.is_file():
                self.explicit = {p.parent.parent.name: p}
                self.src = p.parent.parent.parent
            elif (p / "retrain").is_dir():
                self.src = p / "retrain"
            elif p.is_dir():
                self.src = p
            else:
                raise ConfigError("retrain.resume", f"{str(p)!r} is neither a run directory nor a checkpoint file")
        if self.src is not None and (self.src / "key.txt").exists():
            old = (self.src / "key.txt").read_text().strip()
            if old != key:
                raise ConfigError("retrain.resume", f"the checkpoints in {self.src} belong to another retrain "
                                                    f"configuration (key {old}, this run {key}); resume with the "
                                                    f"same overrides, or set retrain.resume=false to start over")
        root.mkdir(parents=True, exist_ok=True)
        if _rank() == 0:
            (root / "key.txt").write_text(key + "\n")

    def finished(self, phase: str) -> Path | None:
        if self.src is None:
            return None
        d = self.src / phase
        return d if (d / "done.json").exists() and (d / "model.pt").exists() else None

    def checkpoint(self, phase: str) -> Path | None:
        if phase in self.explicit:
            return self.explicit[phase]
        if self.src is None:
            return None
        c = self.src / phase / "checkpoints" / "last.ckpt"
        return c if c.exists() else None

