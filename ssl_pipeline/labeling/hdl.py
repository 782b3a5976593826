"""HDL: Hierarchical Dynamic Labeling of unlabeled embeddings.

HDL labels a fixed pool of embeddings (transductively) from a few labeled rows,
using the embeddings only (no classifier logits). It follows the HDL reading of
Ma et al. (arXiv 2404.17173): points are labeled in *tiers*, starting with the
unlabeled points most strongly anchored to labeled ones; every tier's labels
join the labeled pool and the next tier is recomputed from the grown pool; the
neighbourhood size ``k`` is chosen adaptively from the labeled data under the
(k, delta_k) label-clusterability assumption; assignments that the
neighbourhood contradicts are flagged as noise. A naive tiered kNN vote lets
early mistakes become anchors; HDL avoids that with the rules below.

Rules (every constant is generic; nothing is chosen per data set)
-----------------------------------------------------------------
1. **Geometry.** Rows are L2-normalised; inner product = cosine. The kNN graph
   (faiss, self excluded; exact up to 50k rows, blocked IVF above) is built on these
   rows, or the given ``neighbors`` graph is reused when it has enough columns.
   The linear expert works on mean-centred, re-normalised rows projected on
   their top ``lr_dim`` principal axes (the "centre + L2" trick for few-shot
   features; the projection only saves time).
2. **Adaptive k and (k, delta_k) clusterability.** For every ``k`` in
   ``k_grid`` each labeled row (of a class with >= 2 labels; at most
   ``max_loo`` rows) is predicted by graph propagation from all *other* labeled
   rows, exactly (one sparse solve per evaluated row, batched). ``delta_k`` =
   this leave-one-out error, the estimated rate at which a row's
   k-neighbourhood leads to a wrong label. ``k_`` is the k of lowest ``delta_k``
   (ties: the smaller), but only if it beats the default k (``k_default``) by more
   than one standard error of the default's estimate; otherwise the default stays
   (the estimate is noisy with few labels; a one-SE rule towards the *smallest* k
   picked the smallest grid value almost always). The grid (3, 5, 10) is scanned
   upwards and stops at the first k two standard errors worse than the best so far
   (the largest k cost the most to solve). With one label per class nothing can be
   left out: ``k_ = k_default`` (5; at most a quarter of the mean class size, at
   least 3) and ``delta_k_`` is estimated from the
   final labeling (share of rows whose ``k_`` neighbours do not all carry their
   label).
3. **Two experts, recomputed every tier.** (a) *Propagation*: kNN graph with
   weights ``max(cos, 0) ** gamma``, symmetrised and normalised
   (``D^-1/2 W D^-1/2``, Iscen et al. 2019); ``Z = (I - alpha S)^-1 Y`` by block
   conjugate gradient, warm-started from the previous tier, where ``Y`` holds
   the current pool with each class's seed mass normalised to 1. ``Z`` is
   column-normalised (every class the same mass: a tail class with one label
   is not outvoted by head classes), re-weighted by a class prior from
   ``n_prior_iter`` EM steps (head classes are not squeezed either), and
   row-normalised. Rows no labeled row reaches take the mean posterior of
   their k-means cluster (rule 6). (b) *Linear*: multinomial logistic
   regression (L2, ``C``; L-BFGS, warm-started) on the pool, each pseudo label
   weighted by its confidence, at most ``max_fit_per_class`` rows per class.
   (c) *Text* (``fit(..., text=T)``, T (C, D) class-name embeddings in class order):
   the zero-shot posterior ``softmax(beta X T^T)``, ``beta`` fit on the labeled rows
   (:mod:`ssl_pipeline.labeling.text`). Tier posterior = product of experts
   ``P ~ Pprop ** prop_weight * Plin * Ptext ** text_weight`` (text_weight: by default
   ``prop_weight + lin_weight_``, the image side's total, so both modalities weigh the same).
   The linear expert's exponent ``lin_weight_`` is ``lin_weight`` (1) unless cross-validation on the labeled
   rows shows another of ``lin_weight * (0, 1/4, 1/2, 1)`` better by two standard errors
   (:meth:`_choose_lin_weight`). With one label per class and no text, the
   linear expert is dropped (``lin_weight_ = 0``) when, in the first tier, its labels (a logistic
   regression on the C labeled rows) agree with the propagation's on fewer than ``min_lin_agreement``
   (0.6) of the unlabeled rows (``lin_agreement_``): the two experts then disagree on nearly half the pool,
   the classes are not told apart linearly from one image each, and refitting the linear expert on the
   propagation's pseudo labels tier after tier amplifies their errors (oxford_pets, 1 label per class,
   agreement 0.49-0.54: 0.527 -> 0.571; the other sets agree on 0.67-0.84 and keep it). When it is kept
   (one label per class, no text, classes not Sinkhorn-balanced) every class has the same total weight in its
   fit: nothing but the pool's pseudo labels tells the class sizes apart, and with their sizes as weights a
   class that grows in one tier gets a larger bias in the next (cifar10_test500 0.733 -> 0.748, oxford_flowers
   0.836 -> 0.850; with two labels it cost caltech101 1 point). With two labels in some class, the given labels
   keep at least ``label_share`` (0.2) of their class's weight in the fit however many pseudo labels join
   (a class's labels cover its modes; the confident pseudo labels of the tiers may come from one of them).
   **Class balance** (:mod:`ssl_pipeline.labeling.balance`, ``balance="auto"``, no text): from the first tier
   whose predicted class sizes are as even as Poisson noise allows, whose balancing moves the class priors
   little, or whose Sinkhorn-balanced labeling is at least as modular on the kNN graph as the unbalanced one, every
   tier's posterior is Sinkhorn-balanced over the unlabeled rows (``balanced_``), so a class whose only label sits
   in another class's region cannot lose its rows to it; long-tailed classes pass none of the tests.
4. **Hierarchical, class-balanced tiers.** After tier ``t`` (of ``n_tiers``: by default 8, 5 with text;
   :meth:`_tier_schedule`, which also halves the warm L-BFGS fits with one label per class) the pool is
   rebuilt from the given labels plus, for every class, the top ``t / n_tiers`` fraction of the unlabeled
   rows now predicted as that class, by confidence. Every class admits the same *fraction* of its predicted
   members, so a tail class is never swallowed by a head class, and tier 1 admits only the rows most
   strongly anchored to the labeled ones. The last tier labels every row. With two labels in some class the
   propagation's seed mass of a class is shared equally by its labeled rows' *basins* (each pool row joins its
   class's nearest labeled row), as in tier 1, so a labeled mode keeps its share as the pool grows.
5. **Dynamic revision.** Each tier refits both experts on the grown pool and
   re-predicts *every* pseudo label; a label from an earlier tier that the
   refitted experts (propagation is the neighbourhood's vote) now contradict
   is revised, or evicted from the pool, instead of staying an anchor.
   ``tier_`` is the tier from which a row stayed in the pool to the end.
   **Validated tiers** (:func:`ssl_pipeline.labeling.propagation._tier_loo_correct`): every tier's
   propagation is scored leave-one-out on the labeled rows of rule 2; a tier that gets them wrong more often
   than tier 1, by a paired sign test at two standard errors, is undone and the tiers stop (``n_tiers_``).
6. **Second opinion.** k-means (faiss, on the top 64 principal axes) with the
   number of clusters chosen automatically among 1, 2 and 4 times the number
   of classes (at least 5 rows per cluster) by normalised mutual information
   with the tier-1 labels. It labels the rows the graph cannot reach when the
   propagation is the only expert (no linear expert, no text; otherwise those rows
   keep a uniform propagation posterior and the other experts decide them: the same
   labels on the five real CLIP sets, 5% of the time) and, if
   ``cluster_weight > 0``, also orders admission (off by default: it did not
   help on real CLIP sets). It is computed only when needed; ``n_clusters_`` is 0 otherwise.
7. **Noise.** ``agreement_`` = similarity-weighted share of a row's ``k_``
   neighbours carrying its final label; ``noise_`` flags rows (given ones
   included) whose neighbourhood majority is another class and whose
   agreement is below one half. Given labels are never changed.
8. **Confidence.** The final posterior of the row's label (1 for given labels):
   it ranks likely errors last. **Calibrated** (``calibrate``): when some class has two labels, the
   posterior is raised to the power ``1 / temperature_`` (rows renormalised; labels unchanged, the ranking
   nearly: two rows' order can swap when their posteriors spread differently over the other classes), the
   temperature chosen so the mean confidence of the unlabeled rows equals the kept
   tier's leave-one-out accuracy on the labeled rows (rule 5; rule-of-succession smoothed). Without a
   second label per class there is no held-out evidence and the temperature stays 1; with text it stays
   1 too (that accuracy is the image propagation's alone, well below the text-aided labels', and the text
   expert's own temperature is already fit on the labeled rows).

Everything is O(N k) memory (sparse N x k graph, N x C dense posteriors; the
centred rows of the linear expert are made in batches, never as a second copy of
the embeddings); the only loops run over tiers, EM steps, CG iterations and
candidate k values. Above 50k rows the propagation runs with the rows sorted by a
coarse k-means, so the sparse products read neighbouring rows from the cache.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.labeling.admission import _nearest_labeled, admitted, basin_seed_weights
from ssl_pipeline.labeling.balance import _sinkhorn, classes_balanced
from ssl_pipeline.labeling.base import BaseLabeler, check_labels
from ssl_pipeline.labeling.calibration import match_temperature, power_rows
from ssl_pipeline.labeling.knn import KNNGraph
from ssl_pipeline.labeling.linear import (
    _fit_pool,
    _LinearExpertPredict,
    _LinearFeatures,
    _principal_axes,
    _softmax_proba,
)
from ssl_pipeline.labeling.noise import neighbourhood_checks
from ssl_pipeline.labeling.propagation import (
    _balanced_posterior,
    _cluster_mean,
    _Graph,
    _locality_order,
    _neighbour_graph,
    _tier_loo_correct,
    _worse_than,
)
from ssl_pipeline.labeling.selection import _Choices
from ssl_pipeline.labeling.text import check_text, text_posterior

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the estimator
class HDL(_Choices, _LinearExpertPredict, BaseLabeler):
    """Hierarchical Dynamic Labeling: tiered, class-balanced, self-correcting pseudo-labeling.

    See the module docstring for the rules. Fit transductively on every row::

        hdl = HDL().fit(X, y)            # X (N, D), y (N,) with -1 = unlabeled
        hdl.labels_, hdl.confidence_, hdl.tier_, hdl.noise_

    Parameters
    ----------
    n_tiers : int or None
        Number of tiers; tier ``t`` admits the top ``t / n_tiers`` of each class. None: 8, or 5 with text (rule 4).
    k : int or None
        Neighbourhood size; ``None`` chooses it from the labeled data among ``k_grid``.
    k_grid : tuple of int
        Candidate neighbourhood sizes for the adaptive choice.
    k_default : int
        Neighbourhood size when the labeled data cannot rank ``k_grid`` (one label per class).
    alpha : float
        Propagation strength in ``(I - alpha S)^-1``.
    gamma : float
        Exponent on cosine similarities for the graph weights.
    prop_weight : float
        Exponent of the propagation expert in the product of experts (linear expert: 1).
    C : float
        Inverse L2 regularisation of the linear expert (as in scikit-learn).
    n_prior_iter : int
        EM steps that estimate the class prior of the propagation expert.
    n_clusters : int or None
        k-means clusters for the second opinion; ``None`` picks it automatically, 0 disables it.
    max_loo : int
        At most this many labeled rows are scored leave-one-out when choosing ``k``.
    max_fit_per_class : int
        At most this many (most confident) rows per class fit the linear expert.
    lr_max_iter : int
        L-BFGS iterations of the linear expert's first fit.
    lr_warm_iter : int
        L-BFGS iterations of the linear expert in the later tiers, warm-started from the previous tier's
        weights (10 against 15: the same labels over the five sets, seeds 0-2, in 10% less time; halved with one
        label per class and no text, rule 4).
    cg_iter : int
        Conjugate-gradient iterations of the first propagation (and of the leave-one-out solves of rule 2).
    cg_warm_iter : int
        Conjugate-gradient iterations of the later tiers' propagations, warm-started from the previous tier's
        (6, with 8 tiers: rule 4; 10 against 14 at 5 tiers gave the same mean accuracy over the five sets).
    cluster_weight : float
        Exponent of the cluster agreement in the admission ranking (0: clusters only label unreached rows).
    lr_dim : int or None
        Principal axes kept for the linear expert (None: all).
    blas_threads : int or None
        BLAS threads during ``fit``; 1 avoids OpenBLAS stalls (10x slower fits were measured on a busy
        2-core machine with 2 threads); None keeps the library default.
    admission : {"class", "seed"}
        Groups within which a tier admits its top ``t / n_tiers``: each predicted class (default), or each
        predicted class within the basin of its nearest labeled rows (``seed``: the first of the 10 nearest
        labeled rows with that class). ``seed`` keeps every labeled mode of a multi-modal class in the pool;
        it keeps multi-modal synthetic classes whole, but on real CLIP sets it cost cifar10_test500 1-3 points.
    text_weight : float or None
        Exponent of the text expert (``fit(..., text=T)``) in the product of experts; None: the sum of the
        image experts' exponents (``prop_weight`` + the chosen linear weight), so the two modalities weigh
        the same (the image experts are not independent of each other: both read the same images).
    calibrate : bool
        Fit the confidence temperature of rule 8 (needs a class with two labels; not used with text).
    balance : {"auto", True, False}
        Sinkhorn-balance every tier's posterior over the unlabeled rows (rule 3): ``"auto"`` from the first
        tier whose predicted class sizes look balanced, True always, False never.
    label_share : float
        Least share of its class's weight that the given labels keep in the linear expert's fit (rule 3).
    min_lin_agreement : float
        With one label per class, the least first-tier agreement of the linear expert with the propagation
        for the linear expert to be kept (rule 3).
    random_state : int
        Seed of k-means and of the subsampling.

    Attributes
    ----------
    classes_ : (C,) int64
    labels_ : (N,) int64
    confidence_ : (N,) float32 in [0, 1], 1 on labeled rows
    proba_ : (N, C) float32, the last tier's posterior
    tier_ : (N,) int, 0 for given labels, else the tier from which the row stayed in the pool
        (``n_tiers_`` for rows labeled only by the last tier)
    n_tiers_ : int, tiers run and kept (rule 4's count unless a tier failed the validation of rule 5)
    tier_loo_accuracy_ : list of float, each tier's leave-one-out accuracy on the labeled rows
        (empty when no class has two labels)
    noise_ : (N,) bool
    text_beta_ : float or None, the text expert's inverse temperature (None without text)
    lin_weight_ : float, the linear expert's exponent (rules 2, 3); lin_agreement_ : float or None, its
        first-tier agreement with the propagation (one label per class, no text; None otherwise)
    balanced_ : bool, whether the tiers' posteriors were class-balanced (``balance``)
    temperature_ : float, the confidence temperature of rule 8 (1.0 when not fit)
    agreement_ : (N,) float32
    k_ : int, delta_k_ : float, k_scores_ : dict {k: delta_k}
    n_clusters_ : int
    class_prior_ : (C,) float, the propagation expert's EM class prior
    coef_ : (r, C) float32, intercept_ : (C,) float32, center_ : (D,) float32,
    components_ : (D, r) float32 or None (linear expert, used by ``predict_proba``)
    """

    def __init__(self, n_tiers: int | None = None, k: int | None = None, k_grid: tuple[int, ...] = (3, 5, 10),
                 k_default: int = 5, alpha: float = 0.99, gamma: float = 3.0, prop_weight: float = 0.5,
                 lin_weight: float = 1.0,
                 C: float = 10.0, n_prior_iter: int = 3, n_clusters: int | None = None, max_loo: int = 128,
                 max_fit_per_class: int = 1000, lr_max_iter: int = 15, lr_warm_iter: int = 10, cg_iter: int = 20,
                 cg_warm_iter: int = 6,
                 cluster_weight: float = 0.0, lr_dim: int | None = 256, blas_threads: int | None = 1,
                 admission: str = "class", text_weight: float | None = None, calibrate: bool = True,
                 balance: str | bool = "auto", min_lin_agreement: float = 0.6, label_share: float = 0.2,
                 random_state: int = 0):
        self.n_tiers = n_tiers
        self.k = k
        self.k_grid = k_grid
        self.k_default = k_default
        self.alpha = alpha
        self.gamma = gamma
        self.prop_weight = prop_weight
        self.lin_weight = lin_weight
        self.C = C
        self.n_prior_iter = n_prior_iter
        self.n_clusters = n_clusters
        self.max_loo = max_loo
        self.max_fit_per_class = max_fit_per_class
        self.lr_max_iter = lr_max_iter
        self.lr_warm_iter = lr_warm_iter
        self.cg_iter = cg_iter
        self.cg_warm_iter = cg_warm_iter
        self.cluster_weight = cluster_weight
        self.lr_dim = lr_dim
        self.blas_threads = blas_threads
        self.admission = admission
        self.text_weight = text_weight
        self.calibrate = calibrate
        self.balance = balance
        self.min_lin_agreement = min_lin_agreement
        self.label_share = label_share
        self.random_state = random_state


    # ------------------------------------------------------------ fit
    def fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None = None, text: NDArray | None = None) -> HDL:
        """Label every row of ``X`` (N, D) from the labeled rows of ``y`` (N,), -1 = unlabeled; ``text`` (C', D):
        optional class-name embeddings of the same model, row ``c`` for label value ``c``."""
        from threadpoolctl import threadpool_limits

        if self.blas_threads is None:
            return self._fit(X, y, neighbors, text)
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            return self._fit(X, y, neighbors, text)

    def _fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None, text: NDArray | None) -> HDL:
        if self.balance not in ("auto", True, False):
            raise ValueError(f"HDL balance must be 'auto', True or False, got {self.balance!r}")
        if self.admission not in ("class", "seed"):
            raise ValueError(f"HDL admission must be 'class' or 'seed', got {self.admission!r}")
        X, y, classes = check_labels(X, y, keep_rows=True)  # float16 memory maps are read in batches
        n, n_classes = len(X), len(classes)
        if n < 2:
            raise ValueError("HDL needs at least 2 rows")
        if not 0.0 <= self.label_share < 1.0:
            raise ValueError(f"label_share must be in [0, 1), got {self.label_share}")
        if self.n_tiers is not None and self.n_tiers < 1:
            raise ValueError(f"n_tiers must be >= 1, got {self.n_tiers}")
        self.classes_ = classes
        labeled = y >= 0
        lab_rows = np.flatnonzero(labeled)
        unl_rows = np.flatnonzero(~labeled)
        lab_pos = np.searchsorted(classes, y[lab_rows])

        # geometry: kNN graph on unit rows, centred rows (made on demand) for the linear expert
        self.center_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.components_, centred = _principal_axes(X, self.lr_dim, self.random_state, mean=self.center_,
                                                    keep_sample=True)
        Xl = _LinearFeatures(X, self.center_, self.components_, centred=centred)
        del centred
        k_need = self.k if self.k is not None else max(max(self.k_grid), self.k_default)
        g = _neighbour_graph(X, int(min(k_need, n - 1)), neighbors)
        order = _locality_order(X, self.random_state)
        self.k_, self.k_scores_, evaluated, loo_post, S, self_infl = self._choose_k(g, lab_rows, lab_pos, n_classes,
                                                                                   n, order)
        self.lin_weight_, self.lin_weight_scores_ = self._choose_lin_weight(Xl, lab_rows, lab_pos, n_classes,
                                                                            evaluated, loo_post)
        if S is None:
            S = _Graph.from_graph(g, self.k_, self.gamma, order)
        # text expert: the zero-shot posterior of the class-name embeddings, temperature fit on the labeled rows
        P_text, self.text_beta_ = None, None
        # the text counts as much as the image evidence together (propagation and linear expert see the same
        # images, so their exponents add up), unless text_weight is given
        self.text_weight_ = (float(self.text_weight) if self.text_weight is not None
                             else float(self.prop_weight + self.lin_weight_))
        if text is not None:
            P_text, self.text_beta_ = text_posterior(X, check_text(text, X.shape[1], classes), lab_rows, lab_pos,
                                                     seed=self.random_state)
            np.log(P_text + 1e-12, out=P_text)

        pool_rows, pool_pos, pool_w = lab_rows, lab_pos, np.ones(len(lab_rows), np.float32)
        since = np.zeros(n, np.int64)          # tier from which a row has stayed in the pool
        in_pool = np.zeros(n, bool)
        Z = theta = assign = None
        prev = None                            # (P, pred, conf) of the previous tier
        seed_nn = None                         # nearest labeled rows of the unlabeled rows (admission="seed")
        ok_first = None                        # LOO correctness of tier 1 (labeled rows only)
        self.n_clusters_ = 0
        self.lin_agreement_ = None
        self.tier_loo_accuracy_ = []
        n_tiers, lr_warm, cg_warm = self._tier_schedule(lab_pos, n_classes, text is not None)
        multi = len(lab_pos) > 0 and np.bincount(lab_pos, minlength=n_classes).max() >= 2
        self.n_tiers_ = n_tiers
        for t in range(1, n_tiers + 1):
            # (a) propagation expert from the current pool, each class's seed mass normalised to 1
            if t > 1 and multi:  # every labeled row's basin the mass 1 / n_c (rule 4)
                seed_w = basin_seed_weights(X, pool_rows, pool_pos, pool_w, len(lab_rows), n_classes)
            else:
                mass = np.bincount(pool_pos, weights=pool_w, minlength=n_classes)
                seed_w = (pool_w / np.maximum(mass[pool_pos], 1e-30)).astype(np.float32)
            x0, Z = (None if Z is None else [Z]), None  # the warm start is handed over (and consumed)
            Z = S.solve_seeds(pool_rows, pool_pos, seed_w, n_classes, self.alpha,
                              n_iter=self.cg_iter if x0 is None else cg_warm, X0=x0)
            del x0
            if evaluated is not None:
                # validation by the given labels: leave-one-out correctness of this tier's propagation on the
                # evaluated labeled rows (their own seed's influence removed); a tier that is worse than tier 1
                # (the only unbiased score, rule 5) by a paired sign test (McNemar, two standard errors) is
                # undone, tiers stop
                ok_t = _tier_loo_correct(Z, lab_rows[evaluated], lab_pos[evaluated], self_infl, seed_w[evaluated])
                self.tier_loo_accuracy_.append(float(ok_t.mean()))
                ok_first = ok_t if ok_first is None else ok_first
                worse = _worse_than(ok_first, ok_t)
                if prev is not None and worse:
                    log.info("HDL: tier %d lowers the leave-one-out accuracy on the labeled rows below tier 1's "
                             "(%.3f < %.3f): keeping tier %d", t, ok_t.mean(), ok_first.mean(), t - 1)
                    P, pred, conf = prev[0].astype(np.float32), prev[1], prev[2]
                    P /= P.sum(axis=1, keepdims=True)
                    self.n_tiers_ = t - 1
                    if theta is None:
                        theta = _fit_pool(Xl, pool_rows, pool_pos, pool_w, n_classes, self.C, None,
                                          self.max_fit_per_class, self.lr_max_iter)
                    break
            prev = None
            P_prop, self.class_prior_ = _balanced_posterior(Z, self.n_prior_iter)
            unreached = Z.max(axis=1) <= 0
            # unreached rows keep a uniform propagation posterior when another expert (linear, text) decides them;
            # the k-means opinion stands in only for a propagation that is alone (rule 6)
            opinion = unreached.any() and self.lin_weight_ == 0 and P_text is None
            if assign is None and opinion and t > 1:  # the previous tier's labels (computed on demand)
                self.n_clusters_, assign = self._cluster_opinion(X, pred, n_classes)
            if assign is not None and opinion:
                # rows no labeled row reaches through the graph take their k-means cluster's opinion
                P_prop[unreached] = _cluster_mean(P_prop, assign, self.n_clusters_, ~unreached)[unreached]
            # (b) linear expert from the current pool (capped per class, most confident first)
            # (skipped but for the last tier, which serves predict_proba, when its weight is 0)
            if self.lin_weight_ > 0 or t == n_tiers:
                # one label per class (no text, not balanced): every class the same total weight (rule 3)
                theta = _fit_pool(Xl, pool_rows, pool_pos, pool_w, n_classes, self.C, theta, self.max_fit_per_class,
                                  self.lr_max_iter if theta is None else lr_warm,
                                  equal_classes=evaluated is None and t > 1 and not self.balanced_ and P_text is None,
                                  n_lab=len(lab_rows) if multi else 0, label_share=self.label_share)
            # product of experts, in place: P ~ Pprop ** prop_weight * Plin ** lin_weight * Ptext ** text_weight
            P = P_prop
            P += 1e-12
            np.log(P, out=P)
            # exponents are relative weights: alone (no linear weight, no text) the propagation expert is the posterior
            P *= self.prop_weight if (self.lin_weight_ > 0 or P_text is not None) else 1.0
            if self.lin_weight_ > 0:
                P_lin = _softmax_proba(theta, Xl, n_classes)
                if t == 1 and evaluated is None and P_text is None and len(unl_rows):
                    # one label per class, no held-out row: the linear expert is kept only if it agrees with the
                    # propagation on most unlabeled rows (rule 3)
                    self.lin_agreement_ = float((np.argmax(P_lin[unl_rows], axis=1)
                                                 == np.argmax(P[unl_rows], axis=1)).mean())
                    if self.lin_agreement_ < self.min_lin_agreement:
                        self.lin_weight_ = 0.0
                        P /= self.prop_weight  # the propagation alone is the posterior
                if self.lin_weight_ > 0:
                    P_lin += 1e-12
                    np.log(P_lin, out=P_lin)
                    P_lin *= self.lin_weight_
                    P += P_lin
                del P_lin
            if P_text is not None:
                P += self.text_weight_ * P_text
            P -= P.max(axis=1, keepdims=True)
            np.exp(P, out=P)
            P /= P.sum(axis=1, keepdims=True)
            if t == 1 or (self.balance == "auto" and not self.balanced_):
                # not with text: the class names anchor every class (forced balance cost cifar10_test500 2-3 points);
                # tested again after every tier until it passes (later labelings are better evidence)
                self.balanced_ = self.balance is True or (
                    self.balance == "auto" and P_text is None
                    and classes_balanced(P, unl_rows, lab_rows, lab_pos, g.idx[:, :self.k_]))
            if self.balanced_:
                _sinkhorn(P, unl_rows)
            pred = np.argmax(P, axis=1)
            pred[lab_rows] = lab_pos
            conf = P[np.arange(n), pred]
            if t == 1 and (self.cluster_weight > 0 or (unreached.any() and self.lin_weight_ == 0 and P_text is None)):
                self.n_clusters_, assign = self._cluster_opinion(X, pred, n_classes)
            score = conf
            if assign is not None and self.cluster_weight > 0:
                score = conf * _cluster_mean(P, assign, self.n_clusters_)[np.arange(n), pred] ** self.cluster_weight
            log.debug("tier %d: pool %d rows", t, len(pool_rows))
            if t == n_tiers:
                break
            # kept in case the next tier is undone: a float32 copy, or half the memory in float16 above 2^25
            # entries (float16 conversion is slow: 5% of a 4k x 100 fit)
            prev = (P.copy() if P.size <= 2 ** 25 else P.astype(np.float16), pred, conf)
            P = P_prop = None
            # (c) next pool: given labels + the top t/T of every class's predicted members
            # admission groups: the predicted class, or (admission="seed") the class within the basin of its
            # nearest labeled row, so a class's pool covers each of its labeled modes, not only its best-covered
            if self.admission == "seed" and seed_nn is None:
                seed_nn = _nearest_labeled(X, lab_rows, unl_rows)
            adm = admitted(pred[unl_rows], score[unl_rows], unl_rows, t / n_tiers, lab_pos, seed_nn)
            newly = np.zeros(n, bool)
            newly[adm] = True
            since = np.where(newly & ~in_pool, t, np.where(newly, since, 0))
            in_pool = newly
            pool_rows = np.concatenate([lab_rows, adm])
            pool_pos = np.concatenate([lab_pos, pred[adm]])
            pool_w = np.concatenate([np.ones(len(lab_rows), np.float32), conf[adm].astype(np.float32)])

        self.temperature_ = 1.0
        if self.calibrate and P_text is None and self.tier_loo_accuracy_ and len(unl_rows):
            # rule 8: mean confidence of the unlabeled rows = the kept tier's LOO accuracy (smoothed)
            n_ev = len(evaluated)
            target = (self.tier_loo_accuracy_[self.n_tiers_ - 1] * n_ev + 1.0) / (n_ev + 2.0)
            e = match_temperature(P, target, unl_rows, seed=self.random_state)
            power_rows(P, e)
            conf = P[np.arange(n), pred]
            self.temperature_ = 1.0 / e
        self.proba_ = P
        self.labels_ = np.where(labeled, y, classes[pred]).astype(np.int64)
        self.confidence_ = np.where(labeled, 1.0, np.clip(conf, 0.0, 1.0)).astype(np.float32)
        tier = np.where(in_pool, since, self.n_tiers_)
        self.tier_ = np.where(labeled, 0, tier).astype(np.int64)
        d = Xl.shape[1]
        del Z
        self.coef_ = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
        self.intercept_ = theta[d * n_classes:].astype(np.float32)
        self.agreement_, self.noise_, same_all = neighbourhood_checks(g, self.k_, self.classes_, self.labels_)
        self.delta_k_ = float(self.k_scores_[self.k_]) if self.k_scores_ else 1.0 - same_all
        return self
