"""Stage 2, cluster: a faiss cosine kNN graph over the training rows and k-means clusters.

Artifact folder::

    rows.npy        (N,) int64 table rows of the graph's points (train rows with an embedding)
    knn_idx.npy     (N, K) int64 positions (into rows.npy) of each point's K nearest others
    knn_sim.npy     (N, K) float32 their cosine similarities
    clusters.npy    (N,) int64 k-means cluster of each point
    centroids.npy   (n_clusters, D) float32
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import ArtifactCache, atomic_save_npy, stable_hash, write_json
from ssl_pipeline.data.table import SampleTable
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.labeling.clustering import choose_n_clusters, kmeans
from ssl_pipeline.labeling.knn import KNNGraph, knn_graph
from ssl_pipeline.stages.encode import EmbeddingStore

log = logging.getLogger(__name__)


def graph_rows(table: SampleTable, store: EmbeddingStore) -> np.ndarray:
    """Positions in the store of the training rows (the points every labeler sees)."""
    return np.flatnonzero(table.train[store.rows])


def index_kind(cfg: DictConfig, n: int) -> str:
    kind = cfg.get("index", "auto")
    if kind == "auto":
        return "flat" if n <= int(cfg.exact_max_rows) else "ivf"
    if kind not in ("flat", "ivf", "hnsw"):
        raise ConfigError("cluster.index", f"must be auto, flat, ivf or hnsw, got {kind!r}")
    return kind


def load_graph(path: Path) -> KNNGraph:
    return KNNGraph(idx=np.load(path / "knn_idx.npy"), sim=np.load(path / "knn_sim.npy"))


def run(cfg: DictConfig, table: SampleTable, store: EmbeddingStore, cache: ArtifactCache, upstream: str,
        force: bool = False) -> tuple[Path, dict, str]:
    """Run (or reuse) the cluster stage; return (artifact dir, metrics, key)."""
    ccfg = cfg.cluster
    if int(ccfg.k) < 1:
        raise ConfigError("cluster.k", f"must be >= 1, got {ccfg.k}")
    pos = graph_rows(table, store)
    key = cache.key("cluster", {"cfg": OmegaConf.to_container(ccfg, resolve=True), "rows": stable_hash(pos.tolist())},
                    upstream)
    final = cache.path("cluster", key)
    if cache.is_complete("cluster", key) and not force:
        log.info("cluster: reusing %s", final)
        return final, json.loads((final / "stage_metrics.json").read_text()), key
    t0 = time.perf_counter()
    X = store.load()[pos]
    n = len(X)
    kind = index_kind(ccfg, n)
    log.info("cluster: %s kNN graph, k=%d, over %d points", kind, ccfg.k, n)
    g = knn_graph(X, int(ccfg.k), kind=kind, seed=int(ccfg.seed)) if kind != "flat" else knn_graph(X, int(ccfg.k))
    if ccfg.n_clusters == "auto":
        n_clusters, _ = choose_n_clusters(X, seed=int(ccfg.seed), graph_idx=g.idx[:, :10])
    else:
        n_clusters = int(ccfg.n_clusters)
        if n_clusters < 1:
            raise ConfigError("cluster.n_clusters", f"must be 'auto' or >= 1, got {ccfg.n_clusters}")
    centroids, assign = kmeans(X, n_clusters, n_iter=int(ccfg.kmeans_iter), max_sample=int(ccfg.kmeans_max_sample),
                               seed=int(ccfg.seed))
    metrics = {"cluster/n_points": n, "cluster/k": int(ccfg.k), "cluster/n_clusters": int(n_clusters),
               "cluster/index": kind, "cluster/seconds": round(time.perf_counter() - t0, 2)}
    with cache.writing("cluster", key) as tmp:
        atomic_save_npy(tmp / "rows.npy", store.rows[pos])
        atomic_save_npy(tmp / "knn_idx.npy", g.idx)
        atomic_save_npy(tmp / "knn_sim.npy", g.sim)
        atomic_save_npy(tmp / "clusters.npy", assign)
        atomic_save_npy(tmp / "centroids.npy", centroids)
        write_json(tmp / "stage_metrics.json", metrics)
    return final, metrics, key
