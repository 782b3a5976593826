"""Stage 2, cluster: a faiss cosine kNN graph over the training rows and k-means clusters.

Artifact folder::

    rows.npy        (N,) int64 table rows of the graph's points (train rows with an embedding)
    knn_idx.npy     (N, K) int64 positions (into rows.npy) of each point's K nearest others
    knn_sim.npy     (N, K) float32 their cosine similarities
    clusters.npy    (N,) int64 k-means cluster of each point
    centroids.npy   (n_clusters, D) float32
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ssl_pipeline.artifacts import array_hash
from ssl_pipeline.errors import ConfigError
from ssl_pipeline.labeling.clustering import choose_n_clusters, kmeans
from ssl_pipeline.labeling.knn import as_unit_rows, build_index, ivf_knn_graph, knn_graph, knn_recall
from ssl_pipeline.stage_io import EmbeddingStore, graph_rows, load_graph, load_rows, write_arrays  # noqa: F401
from ssl_pipeline.stages.base import CachedStage, Context

log = logging.getLogger(__name__)


def index_kind(cfg: DictConfig, n: int) -> str:
    kind = cfg.get("index", "auto")
    if kind == "auto":
        return "flat" if n <= int(cfg.exact_max_rows) else "ivf"
    if kind not in ("flat", "ivf", "hnsw"):
        raise ConfigError("cluster.index", f"must be auto, flat, ivf or hnsw, got {kind!r}")
    return kind


def widen_search(index) -> bool:
    """Double the probes (IVF) or the search breadth (HNSW); False when already at the maximum."""
    import faiss

    if isinstance(index, faiss.IndexIVF):
        if index.nprobe >= index.nlist:
            return False
        index.nprobe = min(index.nlist, index.nprobe * 2)
        return True
    if isinstance(index, faiss.IndexHNSW):
        if index.hnsw.efSearch >= 2048:
            return False
        index.hnsw.efSearch *= 2
        return True
    return False


class Cluster(CachedStage):
    """Stage 2: the cosine kNN graph over the training rows and k-means clusters (single- and multi-label)."""

    name = "cluster"

    def check(self, ctx: Context) -> None:
        if int(ctx.cfg.cluster.k) < 1:
            raise ConfigError("cluster.k", f"must be >= 1, got {ctx.cfg.cluster.k}")

    def key(self, ctx: Context) -> str:
        pos = graph_rows(ctx.table, ctx.state["store"])
        upstream = ctx.key_of("adapt") if "adapt" in ctx.results else ctx.key_of("encode")  # adapt=none: encode
        return ctx.cache.key("cluster", {"cfg": OmegaConf.to_container(ctx.cfg.cluster, resolve=True),
                                         "rows": array_hash(pos)}, upstream)

    def build(self, ctx: Context, out: Path) -> dict:
        store = ctx.state.get("label_store", ctx.state["store"])  # the adapt stage's space when adapt != none
        return build_graph(ctx.cfg.cluster, store, graph_rows(ctx.table, store), out)


def build_graph(ccfg: DictConfig, store: EmbeddingStore, pos: np.ndarray, out: Path) -> dict:
    """The kNN graph + k-means of the store positions ``pos`` into ``out``; return the stage metrics."""
    t0 = time.perf_counter()
    X = as_unit_rows(load_rows(store, pos))  # float16 memory map, read in batches
    n = len(X)
    kind = index_kind(ccfg, n)
    k = int(ccfg.k)
    log.info("cluster: %s kNN graph, k=%d, over %d points", kind, k, n)
    seed, min_recall, sample = int(ccfg.seed), float(ccfg.min_recall), int(ccfg.recall_sample)
    extra = {}
    if kind == "ivf":
        # blocked search in inverted lists; the probe count is set from the recall of a seeded sample (with a
        # one-standard-error margin), then the recall is measured on an independent sample and the probes
        # doubled while it falls short
        g, info = ivf_knn_graph(X, k, min_recall=min_recall, recall_sample=sample, seed=seed)
        recall = knn_recall(X, g, k=10, sample=sample, seed=seed + 1)
        while recall < min_recall and info["nprobe"] < info["nlist"]:
            log.info("cluster: kNN recall %.3f < %.2f, widening the search", recall, min_recall)
            g, info = ivf_knn_graph(X, k, nprobe=2 * info["nprobe"], recall_sample=0, seed=seed)
            recall = knn_recall(X, g, k=10, sample=sample, seed=seed + 1)
        extra = {"cluster/ivf_nlist": info["nlist"], "cluster/ivf_nprobe": info["nprobe"],
                 "cluster/candidates_per_row": round(info["candidates_per_row"], 1)}
    else:
        index = None if kind == "flat" else build_index(X, kind=kind, seed=seed)
        g = knn_graph(X, k, kind=kind, index=index)
        recall = 1.0
        if kind != "flat":
            # approximate lists: measure recall against exact search on a sample; widen the search until it is met
            recall = knn_recall(X, g, k=10, sample=sample, seed=seed)
            while recall < min_recall and widen_search(index):
                log.info("cluster: kNN recall %.3f < %.2f, widening the search", recall, min_recall)
                g = knn_graph(X, k, index=index)
                recall = knn_recall(X, g, k=10, sample=sample, seed=seed)
    if kind != "flat":
        log.info("cluster: kNN recall@10 %.3f on %d sampled rows", recall, min(n, sample))
    t_graph = time.perf_counter() - t0
    if ccfg.n_clusters == "auto":
        n_clusters, _ = choose_n_clusters(X, seed=seed, graph_idx=g.idx[:, :10])
    else:
        n_clusters = int(ccfg.n_clusters)
        if n_clusters < 1:
            raise ConfigError("cluster.n_clusters", f"must be 'auto' or >= 1, got {ccfg.n_clusters}")
    centroids, assign = kmeans(X, n_clusters, n_iter=int(ccfg.kmeans_iter), max_sample=int(ccfg.kmeans_max_sample),
                               seed=seed)
    metrics = {"cluster/n_points": n, "cluster/k": int(ccfg.k), "cluster/n_clusters": int(n_clusters),
               "cluster/knn_recall": round(float(recall), 4),
               "cluster/index": kind, "cluster/graph_seconds": round(t_graph, 2),
               "cluster/seconds": round(time.perf_counter() - t0, 2), **extra}
    write_arrays(out, {"rows": store.rows[pos], "knn_idx": g.idx, "knn_sim": g.sim, "clusters": assign,
                       "centroids": centroids})
    return metrics
