"""Content-addressed artifact cache: ``<cache_dir>/<stage>/<key>/``.

The key of a stage is a hash of its own config plus its upstream stage's key,
so changing the backbone invalidates everything downstream while sweeping a
pseudo-label knob reuses the embeddings and the kNN graph.

Writes are atomic: a stage writes into ``<key>.tmp-<pid>/``; on success a
``_COMPLETE`` marker is written and the folder is renamed to ``<key>/``. A stage
that works in resumable pieces (encode) keeps them in ``<key>.partial/`` across
runs; an interrupted run picks them up again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

log = logging.getLogger(__name__)
MARKER = "_COMPLETE"


def stable_hash(obj: Any, n: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


def array_hash(a: np.ndarray, n: int = 16) -> str:
    """A short hex digest of an array's dtype, shape and bytes (fast for millions of rows)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:n]


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(f)`` on a temp file in ``path``'s folder, fsync it, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` through a temp file and a rename."""
    atomic_write(path, lambda f: np.save(f, array))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class ArtifactCache:
    """The on-disk cache of stage outputs under ``root``."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    def key(self, stage: str, config: Any, upstream: str | None = None) -> str:
        return stable_hash({"stage": stage, "config": config, "upstream": upstream})

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def partial_path(self, stage: str, key: str) -> Path:
        """A folder for resumable pieces of an unfinished stage (kept across runs)."""
        p = self.root / stage / f"{key}.partial"
        p.mkdir(parents=True, exist_ok=True)
        return p

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / MARKER).exists()

    def commit(self, stage: str, key: str, src: Path, meta: dict | None = None) -> Path:
        """Mark ``src`` complete and move it to the final location; return that path.

        If a complete entry already exists (a concurrent run finished first, or
        the stage was forced), the new one replaces it atomically enough: the old
        folder is renamed away before the new one is renamed in.
        """
        write_json(src / MARKER, meta or {})
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            trash = final.with_name(f"{key}.old-{os.getpid()}")
            os.replace(final, trash)
            os.replace(src, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(src, final)
        return final

    def stage(self, name: str, key: str, force: bool = False, partial: bool = False):
        """The one cache check of every stage.

        ``with cache.stage(name, key, force) as st:`` yields a :class:`StageEntry`.
        When ``st.reused`` the complete entry is reused (its stored metrics in
        ``st.metrics``); otherwise the body writes its files into ``st.dir`` and sets
        ``st.metrics``; on a clean exit the metrics are stored and the folder is
        committed to ``st.path`` (atomically); on an exception nothing is committed.
        ``partial=True`` writes into the resumable ``<key>.partial/`` folder instead of
        a fresh temp folder.
        """
        return _stage(self, name, key, force, partial)

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a fresh temp folder; commit it on success, delete it on failure."""
        tmp = self.root / stage / f"{key}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.commit(stage, key, tmp)


class StageEntry:
    """One stage's cache entry, as yielded by :meth:`ArtifactCache.stage`.

    Attributes
    ----------
    name, key : str
    path : Path
        The final (committed) folder ``<cache>/<name>/<key>/``.
    reused : bool
        True when a complete entry existed and the stage was not forced: the
        caller returns :attr:`metrics` and writes nothing.
    dir : Path or None
        Where to write the artifact when not reused (a temp folder, or the
        resumable ``<key>.partial/`` folder).
    metrics : dict
        The stage's metrics: read from ``stage_metrics.json`` when reused; set by
        the caller otherwise (written beside the artifact on commit).
    """

    def __init__(self, name: str, key: str, path: Path, reused: bool, dir: Path | None, metrics: dict):
        self.name, self.key, self.path, self.reused, self.dir, self.metrics = name, key, path, reused, dir, metrics


def _stage_metrics(path: Path) -> dict:
    f = path / "stage_metrics.json"
    return json.loads(f.read_text()) if f.exists() else {}


@contextmanager
def _stage(cache: ArtifactCache, name: str, key: str, force: bool = False, partial: bool = False
           ) -> Iterator[StageEntry]:
    final = cache.path(name, key)
    if cache.is_complete(name, key) and not force:
        log.info("%s: reusing %s", name, final)
        yield StageEntry(name, key, final, True, None, _stage_metrics(final))
        return
    if partial:
        work = cache.partial_path(name, key)
        entry = StageEntry(name, key, final, False, work, {})
        yield entry  # an exception leaves the partial folder for the next run to resume
        write_json(work / "stage_metrics.json", entry.metrics)
        cache.commit(name, key, work)
        return
    with cache.writing(name, key) as tmp:
        entry = StageEntry(name, key, final, False, tmp, {})
        yield entry
        write_json(tmp / "stage_metrics.json", entry.metrics)

