"""Helpers shared by the benchmark scripts: data location, markdown tables, JSON output."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(path: str | None = None) -> Path:
    """The shared real-data folder (``--data`` or ../shared/data); exits with a clear message when absent."""
    p = Path(path) if path else SHARED_DATA
    if not p.exists():
        sys.exit(f"benchmark data folder {p} not found: pass --data /path/to/shared/data")
    return p


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
