"""Helpers shared by the benchmark scripts: data location, markdown tables, JSON output."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(path: str | None = None) -> Path:
    """The shared real-data folder (``--data`` or ../shared/data); exits with a clear message when absent."""
    p = Path(path) if path else SHARED_DATA
    if not p.exists():
        sys.exit(f"benchmark data folder {p} not found: pass --data /path/to/shared/data")
    return p


CACHE_DATA = Path.home() / ".cache" / "ssl_pipeline" / "data"  # extracted archives live here, outside the repository


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` once (a ``.ok`` marker records a finished extraction); exits with a
    "skipped" line when the archive is absent."""
    archive, dest = Path(archive), Path(dest)
    if not (dest / ".ok").exists():
        if not archive.exists():
            sys.exit(f"skipped: archive {archive} is absent (it lives in ../shared/data/images)")
        dest.mkdir(parents=True, exist_ok=True)
        print(f"extracting {archive} to {dest} ...", flush=True)
        with tarfile.open(archive) as t:
            t.extractall(dest, filter="data")
        (dest / ".ok").touch()
    return dest


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")


def print_results_table(out: Path, tables) -> int:
    """``--table``: print ``tables(results)`` of the results file ``out``; 1 (with a message) when it is missing."""
    if not Path(out).is_file():
        print(f"no results file {out}: run the benchmark first", file=sys.stderr)
        return 1
    print(tables(json.loads(Path(out).read_text())))
    return 0


def limit_threads(n: int) -> None:
    """BLAS and torch threads for every method of a benchmark (``n`` <= 0: the libraries' defaults)."""
    if n <= 0:
        return
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    torch.set_num_threads(n)


def embedding_sets(data: Path, sets: list[str] | None = None) -> list[Path] | None:
    """The shared CLIP embedding files ``data/clip_vitb32/*.npz`` (only ``sets``, in that order, when given);
    None, after a "skipped" line, when the folder is absent."""
    folder = Path(data) / "clip_vitb32"
    if not folder.is_dir():
        print(f"skipped: no embeddings folder {folder} (pass --data DIR holding clip_vitb32/)")
        return None
    files = sorted(folder.glob("*.npz"))
    return [f for s in sets for f in files if f.stem == s] if sets else files
