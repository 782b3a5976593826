"""Readers and writers of stage folders: embeddings, tokens, the kNN graph, pseudo-labels.

Every stage reads its upstream artifacts through this module (no stage imports
another stage's module for them).

Encode folder (``encode/<key>/``)::

    shards/emb_00000.npy    (n_ok, D) float16 L2-normalised embeddings, rows in table order
    shards/rows_00000.npy   (n_ok,) int64 table rows of that shard (written last = shard complete)
    shards/skip_00000.json  [[row, reason], ...]
    shards/tok_00000.npy    (n_ok, P, d) float16 spatial tokens (multi-label data only)
    text_embeddings.npy     (C, d) float16, when the backbone has a trained text tower
    skipped.csv, meta.json

Cluster folder: ``rows.npy`` (N,), ``knn_idx.npy`` / ``knn_sim.npy`` (N, K), ``clusters.npy`` (N,),
``centroids.npy`` (n_clusters, D).

Pseudolabel folder (arrays aligned with its ``rows.npy``): single-label ``labels confidence tier noise
agreement labeled``; multi-label ``labeled`` (N,) bool, ``scores`` (N, C) float32, ``decision`` /
``counted`` / ``vetoed`` (N, C) bool, ``head.pt``, ``contexts.json``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_pipeline.artifacts import atomic_save_npy, atomic_write
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import DataError
from ssl_pipeline.labeling.knn import KNNGraph

log = logging.getLogger(__name__)

PSEUDO_ARRAYS = ("rows", "labels", "confidence", "tier", "noise", "agreement", "labeled")
ML_PSEUDO_ARRAYS = ("rows", "labeled", "scores", "decision", "counted", "vetoed")


class EmbeddingStore:
    """Read access to an encode artifact.

    Attributes
    ----------
    rows : (M,) int64
        Table rows that have an embedding (unreadable images are absent).
    dim : int
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        shard_dir = self.path / "shards"
        self.shards = sorted(shard_dir.glob("emb_*.npy"))
        self.rows = np.concatenate([np.load(shard_dir / f.name.replace("emb_", "rows_")) for f in self.shards]) \
            if self.shards else np.zeros(0, np.int64)
        self.meta = json.loads((self.path / "meta.json").read_text()) if (self.path / "meta.json").exists() else {}
        self.dim = int(np.load(self.shards[0], mmap_mode="r").shape[1]) if self.shards else 0

    def load(self, dtype=np.float32) -> np.ndarray:
        """All embeddings (M, D) in ``dtype``, shard by shard (memory-mapped reads)."""
        out = np.empty((len(self.rows), self.dim), dtype)
        s = 0
        for f in self.shards:
            a = np.load(f, mmap_mode="r")
            out[s:s + len(a)] = a
            s += len(a)
        return out

    def matrix(self) -> np.ndarray:
        """All embeddings (M, D) float16 as one read-only memory map, in store order.

        A single shard is mapped directly; several are first concatenated, shard by
        shard, into ``embeddings.npy`` beside them (written once, atomically; a
        float16 file of M x D x 2 bytes). Later stages read rows through the map, so
        their memory does not grow with a float32 copy of all embeddings; where the
        folder cannot be written, the float16 rows are read into memory instead.
        """
        if len(self.shards) == 1:
            return np.load(self.shards[0], mmap_mode="r")
        f = self.path / "embeddings.npy"
        if not f.exists():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
                      "shape": (len(self.rows), self.dim)}

            def write(fh):
                np.lib.format.write_array_header_1_0(fh, header)
                for shard in self.shards:
                    fh.write(np.ascontiguousarray(np.load(shard, mmap_mode="r"), np.float16).tobytes())

            try:
                atomic_write(f, write)
            except OSError as e:
                log.warning("embeddings: cannot write %s (%s); reading the shards into memory", f, e)
                return self.load(np.float16)
        a = np.load(f, mmap_mode="r")
        if a.shape != (len(self.rows), self.dim):
            raise DataError(f"{f}: shape {a.shape} does not match the shards ({len(self.rows)}, {self.dim}); "
                            "delete it to rebuild")
        return a

    def text_embeddings(self) -> np.ndarray | None:
        f = self.path / "text_embeddings.npy"
        return np.load(f).astype(np.float32) if f.exists() else None

    def skipped(self) -> list[dict]:
        f = self.path / "skipped.csv"
        if not f.exists():
            return []
        with f.open() as fh:
            return list(csv.DictReader(fh))


def graph_rows(table: SampleTable, store: EmbeddingStore) -> np.ndarray:
    """Positions in the store of the training rows (the points every labeler sees)."""
    return np.flatnonzero(table.train[store.rows])


def load_rows(store: EmbeddingStore, pos: np.ndarray) -> np.ndarray:
    """Embeddings of the store positions ``pos`` (len(pos), D) float16, unit-norm rows.

    All rows in store order: the store's read-only memory map itself (see
    :meth:`EmbeddingStore.matrix`), no copy; a subset: its float16 rows in memory.
    Later stages read and cast these rows in batches, so their memory does not
    grow with a float32 copy of all embeddings.
    """
    pos = np.asarray(pos, np.int64)
    M = store.matrix()
    if len(pos) == len(M) and (pos == np.arange(len(M))).all():
        return M
    if len(pos) and (pos.min() < 0 or pos.max() >= len(M)):
        raise ValueError(f"requested rows outside the embedding store (0..{len(M) - 1})")
    return np.asarray(M[pos])




def load_graph(path: Path) -> KNNGraph:
    """The kNN graph of a cluster folder: idx (N, K) int64 positions into its rows.npy, sim (N, K) float32."""
    return KNNGraph(idx=np.load(Path(path) / "knn_idx.npy"), sim=np.load(Path(path) / "knn_sim.npy"))


def write_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Each array as ``<name>.npy`` in ``folder`` (atomic writes)."""
    for name, arr in arrays.items():
        atomic_save_npy(Path(folder) / f"{name}.npy", np.asarray(arr))


def read_arrays(folder: Path, names=PSEUDO_ARRAYS) -> dict[str, np.ndarray]:
    """The named ``<name>.npy`` arrays of ``folder`` that exist."""
    folder = Path(folder)
    return {n: np.load(folder / f"{n}.npy") for n in names if (folder / f"{n}.npy").exists()}


@dataclass
class TokenFeatures:
    """Cached features of the readable images of a table.

    Attributes
    ----------
    rows : (M,) int64
        Table rows that have features (unreadable images are absent).
    tokens : (M, P, d) float16
        Spatial tokens.
    pooled : (M, D) float32
        L2-normalised pooled embeddings.
    grid : (h, w)
    text : (C, d) float32 or None
        Class-name text embeddings in the token space (trained text tower only).
    skipped : list of (row, reason)
    """

    rows: np.ndarray
    tokens: np.ndarray
    pooled: np.ndarray
    grid: tuple[int, int]
    text: np.ndarray | None
    skipped: list


def load_features(path: Path) -> TokenFeatures:
    """Read a multi-label encode artifact (tokens + pooled embeddings) into memory."""
    shard_dir = Path(path) / "shards"
    rows_files = sorted(shard_dir.glob("rows_*.npy"))
    rows, toks, pools, skipped = [], [], [], []
    for f in rows_files:
        r = np.load(f)
        skipped.extend(json.loads((shard_dir / f.name.replace("rows_", "skip_").replace(".npy", ".json")).read_text()))
        if len(r) == 0:
            continue
        rows.append(r)
        toks.append(np.load(shard_dir / f.name.replace("rows_", "tok_")))
        pools.append(np.load(shard_dir / f.name.replace("rows_", "emb_")))
    meta = json.loads((Path(path) / "meta.json").read_text())
    text_f = Path(path) / "text_embeddings.npy"
    if not rows:
        return TokenFeatures(np.zeros(0, np.int64), np.zeros((0, 0, 0), np.float16), np.zeros((0, 0), np.float32),
                             tuple(meta["grid"]), None, skipped)
    return TokenFeatures(rows=np.concatenate(rows), tokens=np.concatenate(toks),
                         pooled=np.concatenate(pools).astype(np.float32), grid=tuple(meta["grid"]),
                         text=np.load(text_f).astype(np.float32) if text_f.exists() else None, skipped=skipped)
