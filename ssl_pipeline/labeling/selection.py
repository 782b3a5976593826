"""HDL's data-driven choices: the neighbourhood size k, the linear expert's weight, the cluster opinion.

A mixin of :class:`ssl_pipeline.labeling.hdl.HDL` (the methods read its parameters); every choice is
made from the labeled rows and the geometry of the pool, never per data set.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from ssl_pipeline.labeling.clustering import lloyd_kmeans
from ssl_pipeline.labeling.knn import KNNGraph
from ssl_pipeline.labeling.linear import (
    _fit_softmax,
    _LinearFeatures,
    _principal_axes,
    _project,
    _rank_within_class,
    _softmax_proba,
)
from ssl_pipeline.labeling.propagation import _Graph


class _Choices:
    """Adaptive k, linear-expert weight and cluster opinion of HDL (see its module docstring)."""

    # ------------------------------------------------------------ adaptive k
    def _choose_k(self, g: KNNGraph, lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                  n_classes: int, n: int, order: NDArray[np.int64] | None = None):
        """Leave-one-out propagation on the labeled rows.

        Returns (k, {k: delta_k}, evaluated labeled rows (positions in ``lab_rows``), their LOO
        propagation posteriors at the chosen k (|ev|, C), the propagation graph at the chosen k,
        the evaluated rows' self-influence ``((I - alpha S)^-1)_ii`` at the chosen k); all but the
        first two are None when no class has two labels.
        """
        counts = np.bincount(lab_pos, minlength=n_classes)
        evaluable = np.flatnonzero(counts[lab_pos] >= 2)
        if self.k is not None:
            grid = [int(min(self.k, n - 1))]
        else:
            grid = sorted({int(k) for k in self.k_grid if 1 <= k < n})
        fallback = grid[0] if self.k is not None else int(min(self.k_default, max(3, round(n / n_classes / 4))))
        fallback = min(fallback, n - 1)
        if len(evaluable) == 0 or not grid:
            return fallback, {}, None, None, None, None
        rng = np.random.default_rng(self.random_state)
        if len(evaluable) > self.max_loo:
            evaluable = np.sort(rng.choice(evaluable, self.max_loo, replace=False))
        own = lab_pos[evaluable]
        scores: dict[int, float] = {}
        posts: dict[int, NDArray] = {}
        graphs: dict[int, _Graph] = {}
        diags: dict[int, NDArray] = {}  # self-influence ((I - alpha S)^-1)_ii of the evaluated rows
        batch = int(np.clip(2 ** 25 // n, 16, 128))  # columns solved at a time: (N, batch) arrays of <= 128 MB
        member = sp.csr_matrix((np.ones(len(lab_pos)), (lab_pos, np.arange(len(lab_pos)))),
                               shape=(n_classes, len(lab_pos)))  # class x labeled row indicator
        for k in grid:
            graphs[k] = G_k = _Graph.from_graph(g, k, self.gamma, order)
            post = np.zeros((len(evaluable), n_classes), np.float64)
            diags[k] = np.zeros(len(evaluable), np.float64)
            for s in range(0, len(evaluable), batch):
                ev = evaluable[s:s + batch]
                G = G_k.solve_seeds(lab_rows[ev], np.arange(len(ev)), np.ones(len(ev), np.float32), len(ev),
                                    self.alpha, n_iter=self.cg_iter)[lab_rows]  # (n_L, |ev|): G[j, i]
                diags[k][s:s + len(ev)] = G[ev, np.arange(len(ev))]
                G[ev, np.arange(len(ev))] = 0.0  # leave the row itself out
                votes = np.asarray(member @ np.maximum(G, 0.0).astype(np.float64))
                # mean seed influence per class, the left-out row no longer counting for its own class
                left = counts[:, None] - (np.arange(n_classes)[:, None] == lab_pos[ev][None, :])
                post[s:s + len(ev)] = (votes / np.maximum(left, 1)).T
            post /= np.maximum(post.sum(axis=1, keepdims=True), 1e-30)
            posts[k] = post
            scores[k] = float((np.argmax(post, axis=1) != own).mean())
            # the grid is scanned upwards and stops once a k is clearly (two standard errors) worse than the
            # best so far: delta_k grows with k past its optimum, and the larger k cost the most to solve
            best = min(scores.values())
            if scores[k] > best + 2.0 * np.sqrt(max(best * (1.0 - best), 1.0 / len(evaluable)) / len(evaluable)):
                break
        # the k with the lowest LOO error (ties: the smaller k) replaces the default k only if it is better by
        # more than one standard error of the default's error: with few labeled rows the LOO ranking is noise,
        # and the default is the safer graph (a one-SE rule towards the *smallest* k picked it almost always)
        k_best = min(scores, key=lambda k: (scores[k], k))
        k_def = min(grid, key=lambda k: (abs(k - fallback), k))
        if k_def in scores:
            e = scores[k_def]
            se = float(np.sqrt(max(e * (1.0 - e), 1.0 / len(evaluable)) / len(evaluable)))
            if scores[k_best] >= e - se:
                k_best = k_def
        return k_best, scores, evaluable, posts[k_best], graphs[k_best], diags[k_best]

    def _choose_lin_weight(self, Xl: _LinearFeatures, lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                           n_classes: int, evaluated: NDArray[np.int64] | None, prop_post: NDArray | None
                           ) -> tuple[float, dict[float, float]]:
        """Weight of the linear expert, from held-out labeled rows (default unless clearly worse).

        The linear expert is scored by 4-fold cross-validation on the labeled rows, the propagation
        expert by its leave-one-out posteriors; the combination ``prop_weight * log Pprop + w * log Plin``
        is scored on the same rows for w in ``lin_weight * (0, 1/4, 1/2, 1)``. The default ``w = lin_weight``
        is kept unless another w is better by more than two standard errors: the cross-validated expert is
        fit on the labeled rows alone, much weaker than the one the tiers refit on the pool's pseudo labels,
        so only a plainly worse linear expert should lose its weight. With one standard error it was dropped on
        oxford_pets at 4 labels per class, seed 2 (0.69 where the default weight gives 0.83).
        """
        if evaluated is None or len(evaluated) < 2:
            return float(self.lin_weight), {}
        rng = np.random.default_rng(self.random_state)
        fold = _rank_within_class(lab_pos, rng.random(len(lab_pos))) % 4  # classes spread over the folds
        lin_post = np.zeros((len(evaluated), n_classes), np.float32)
        XL = Xl.take(lab_rows)
        for f in range(4):
            held = evaluated[fold[evaluated] == f]
            if len(held) == 0:
                continue
            train = np.flatnonzero(fold != f)
            theta = _fit_softmax(XL[train], lab_pos[train], np.ones(len(train), np.float32), n_classes,
                                 self.C, None, self.lr_max_iter)
            lin_post[np.searchsorted(evaluated, held)] = _softmax_proba(theta, XL[held], n_classes)
        own = lab_pos[evaluated]
        acc: dict[float, float] = {}
        for frac in (0.0, 0.25, 0.5, 1.0):
            w = float(self.lin_weight) * frac
            logp = self.prop_weight * np.log(prop_post + 1e-12) + w * np.log(lin_post + 1e-12)
            acc[w] = float((np.argmax(logp, axis=1) == own).mean())
        default = float(self.lin_weight)
        best_w = max(acc, key=lambda w: (acc[w], w))
        se = float(np.sqrt(acc[default] * (1.0 - acc[default]) / len(evaluated)))
        return (best_w if acc[best_w] > acc[default] + 2.0 * se else default), acc

    # ------------------------------------------------------------ tier schedule
    def _tier_schedule(self, lab_pos: NDArray[np.int64], n_classes: int, has_text: bool) -> tuple[int, int, int]:
        """(tiers, warm L-BFGS iterations, warm conjugate-gradient iterations) of this fit (rule 4).

        Tiers: ``n_tiers``, or when it is None 8 without text and 5 with text. Smaller steps give the refitted
        experts more chances to revise a tier's mistakes before they are admitted: without text, 8 tiers of 6
        conjugate-gradient iterations against 5 tiers of 10 gave +0.4 points on average over the five real CLIP
        sets at 2, 4 and 8 labels per class (seeds 0-2; oxford_pets +0.4 to +0.9, cifar10_test500 -0.7 to +3.9,
        the other sets within 0.2), for 24% more time. With text the class names anchor every class from tier 1
        on, and 8 tiers changed the mean by less than 0.01 points on the three text sets for 16% more time.
        With one label per class and no text the warm-started L-BFGS fits take half of ``lr_warm_iter``: the
        linear expert is then refit on the propagation's pseudo labels alone (nothing held out), and shorter
        warm-started fits keep it nearer the previous tier's (at 1 label per class: food10 0.949 -> 0.959, over
        the five sets 0.805 -> 0.808; with 2 or more labels per class halving them cost oxford_pets up to 2 points).
        """
        tiers = int(self.n_tiers) if self.n_tiers is not None else (5 if has_text else 8)
        one_each = len(lab_pos) > 0 and np.bincount(lab_pos, minlength=n_classes).max() < 2
        lr_warm = max(1, self.lr_warm_iter // 2) if one_each and not has_text else self.lr_warm_iter
        return tiers, lr_warm, self.cg_warm_iter

    # ------------------------------------------------------------ second opinion
    def _cluster_opinion(self, X: NDArray[np.float32], pred: NDArray[np.int64], n_classes: int
                         ) -> tuple[int, NDArray[np.int64] | None]:
        """k-means on a PCA projection of the centred rows; return (n_clusters, cluster id of every row)."""
        if self.n_clusters == 0 or len(X) < 4:
            return 0, None
        from sklearn.metrics import normalized_mutual_info_score

        n = len(X)
        if self.components_ is not None and self.components_.shape[1] >= 64:
            proj = self.components_[:, :64]  # the same sample's top axes: _principal_axes(X, 64, ...) again
        else:
            proj = _principal_axes(X, 64, self.random_state, mean=self.center_)
        Xp = _project(X, self.center_, proj)
        if self.n_clusters is not None:
            candidates = [int(self.n_clusters)]
        else:
            candidates = [m * n_classes for m in (1, 2, 4) if m * n_classes * 5 <= n] or [max(2, n // 5)]
        best = (-np.inf, 0, None)
        # k-means trains on at most 256 rows per cluster, fewer above 20k rows (64 at 80k and above)
        per_centroid = int(np.clip(256 * 20_000 // n, 64, 256))
        for nc in candidates:
            nc = int(min(max(nc, 2), n))
            _, assign = lloyd_kmeans(Xp, nc, n_iter=10, seed=self.random_state,
                                     max_points_per_centroid=per_centroid)
            score = normalized_mutual_info_score(pred, assign) if len(candidates) > 1 else 0.0
            if score > best[0]:
                best = (score, nc, assign)
        return best[1], best[2]
