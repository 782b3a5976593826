"""Transductive few-shot peers of HDL, re-implemented from their papers (BENCHMARKS.md section 1b).

Every peer is a function ``peer(X, y_masked, text=None) -> (labels (N,), confidence (N,))`` on unit
rows ``X`` (N, D) float32 with ``y_masked`` (N,) = class index in 0..C-1 or -1 (unlabeled); classes
are assumed to be 0..C-1 (the benchmark's files). Each runs at ONE fixed setting, the paper's (or
BENCHMARKS.md's), for every set and shot count; nothing is validated per set.

- ``ncm``: nearest class mean (cosine to the mean of each class's labeled rows).
- ``logreg``: scikit-learn logistic regression on the labeled rows, C = 10.
- ``graph_lp``: Iscen et al. 2019 label propagation, k 10, alpha 0.99, weights cos^3, symmetric
  normalisation, columns normalised per class.
- ``bd_cspn``: Liu et al. 2020, cross-class bias shift of the queries, prototypes rectified with the
  8 most confident queries per class (softmax weights, eps 10).
- ``laplacian_shot``: Ziko et al. 2020, rectified prototypes (as BD-CSPN), unary = squared distance,
  3-NN Laplacian among the queries (symmetric: the gradient of the pairwise term is (W + W^T) Y),
  lambda 0.7, 20 bound updates.
- ``tim``: Boudiaf et al. 2020 TIM-GD, centred + L2 features, prototype init, tau 15,
  loss 0.1 CE(shots) - (H(Y_q) - 0.1 H(Y_q | X_q)), Adam lr 1e-4, 1000 steps.
- ``pt_map``: PT-MAP-style MAP with Sinkhorn-balanced soft assignments (lambda 10, 30 Sinkhorn steps,
  20 prototype updates at rate alpha 0.2, as in Hu et al. 2021), centred + L2 features, no power
  transform (CLIP features are signed).
- text-aware: ``zero_shot`` (argmax X @ text.T) and ``tim_text`` (TransCLIP-style: TIM whose weights
  start at normalise(shot mean) + text, with a KL term pulling every query's posterior towards the
  zero-shot posterior softmax(100 X @ text.T)).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray


def _unit(A: NDArray) -> NDArray[np.float32]:
    A = np.asarray(A, np.float32)
    return A / np.maximum(np.linalg.norm(A, axis=-1, keepdims=True), 1e-12)


def _softmax(S: NDArray) -> NDArray:
    S = S - S.max(axis=1, keepdims=True)
    E = np.exp(S)
    return E / E.sum(axis=1, keepdims=True)


def _centred(X: NDArray) -> NDArray[np.float32]:
    return _unit(X - X.mean(axis=0))


def _means(X: NDArray, y: NDArray, C: int) -> NDArray[np.float32]:
    lab = y >= 0
    M = np.zeros((C, X.shape[1]), np.float64)
    np.add.at(M, y[lab], X[lab])
    return (M / np.maximum(np.bincount(y[lab], minlength=C), 1)[:, None]).astype(np.float32)


def _knn(X: NDArray, k: int, rows: NDArray | None = None) -> tuple[NDArray, NDArray]:
    """Exact cosine kNN (self excluded) among ``rows`` (all rows if None): (sim (n, k), idx (n, k))."""
    Z = X if rows is None else X[rows]
    sim_out = np.empty((len(Z), k), np.float32)
    idx_out = np.empty((len(Z), k), np.int64)
    for s in range(0, len(Z), 2048):
        S = Z[s:s + 2048] @ Z.T
        S[np.arange(len(S)), np.arange(s, s + len(S))] = -np.inf
        idx = np.argpartition(-S, k, axis=1)[:, :k]
        sim = np.take_along_axis(S, idx, axis=1)
        o = np.argsort(-sim, axis=1)
        sim_out[s:s + len(S)] = np.take_along_axis(sim, o, axis=1)
        idx_out[s:s + len(S)] = np.take_along_axis(idx, o, axis=1)
    return sim_out, idx_out


def _out(P: NDArray, y: NDArray) -> tuple[NDArray, NDArray]:
    pred = np.argmax(P, axis=1)
    conf = P.max(axis=1).astype(np.float32)
    lab = y >= 0
    pred[lab], conf[lab] = y[lab], 1.0
    return pred.astype(np.int64), conf


# ---------------------------------------------------------------- image-only peers
def ncm(X: NDArray, y: NDArray, text: NDArray | None = None) -> tuple[NDArray, NDArray]:
    C = int(y.max()) + 1
    return _out(_softmax(10.0 * X @ _unit(_means(X, y, C)).T), y)


def logreg(X: NDArray, y: NDArray, text: NDArray | None = None) -> tuple[NDArray, NDArray]:
    from sklearn.linear_model import LogisticRegression

    lab = y >= 0
    m = LogisticRegression(C=10, max_iter=2000).fit(X[lab], y[lab])
    return _out(m.predict_proba(X), y)


def graph_lp(X: NDArray, y: NDArray, text: NDArray | None = None, k: int = 10, alpha: float = 0.99,
             gamma: float = 3.0) -> tuple[NDArray, NDArray]:
    n, C = len(X), int(y.max()) + 1
    sim, idx = _knn(X, k)
    w = np.maximum(sim, 0.0) ** gamma
    W = sp.csr_matrix((w.ravel(), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n))
    W = W + W.T
    d = np.asarray(W.sum(axis=1)).ravel()
    dinv = 1.0 / np.sqrt(np.maximum(d, 1e-12))
    S = sp.diags(dinv) @ W @ sp.diags(dinv)
    A = (sp.eye(n) - alpha * S).tocsr()
    Y = np.zeros((n, C), np.float64)
    lab = np.flatnonzero(y >= 0)
    Y[lab, y[lab]] = 1.0
    Z = np.zeros_like(Y)
    from scipy.sparse.linalg import cg

    for c in range(C):
        Z[:, c], _ = cg(A, Y[:, c], rtol=1e-6, maxiter=20)
    Z = np.maximum(Z, 0.0)
    Z /= np.maximum(Z.sum(axis=0, keepdims=True), 1e-30)
    P = Z / np.maximum(Z.sum(axis=1, keepdims=True), 1e-30)
    return _out(P, y)


def _rectified_prototypes(X: NDArray, y: NDArray, C: int, top: int = 8, eps: float = 10.0) -> NDArray:
    """BD-CSPN: shift the queries by (support mean - query mean), then rectify each class prototype with
    its ``top`` most confident queries, every member weighted by softmax(eps cos(x, prototype))."""
    lab, unl = y >= 0, y < 0
    Xs = X.copy()
    Xs[unl] += X[lab].mean(axis=0) - X[unl].mean(axis=0)  # cross-class bias
    P0 = _unit(_means(Xs, y, C))
    q = np.flatnonzero(unl)
    prob = _softmax(eps * Xs[q] @ P0.T)
    pred = prob.argmax(axis=1)
    conf = prob.max(axis=1)
    protos = np.empty_like(P0)
    for c in range(C):
        mine = q[pred == c]
        mine = mine[np.argsort(-conf[pred == c])[:top]]
        members = np.concatenate([np.flatnonzero(y == c), mine])
        cos = _unit(Xs[members]) @ P0[c]
        wts = np.exp(eps * (cos - cos.max()))
        protos[c] = (wts[:, None] * Xs[members]).sum(axis=0) / wts.sum()
    return Xs, protos


def bd_cspn(X: NDArray, y: NDArray, text: NDArray | None = None) -> tuple[NDArray, NDArray]:
    C = int(y.max()) + 1
    Xs, protos = _rectified_prototypes(X, y, C)
    return _out(_softmax(10.0 * _unit(Xs) @ _unit(protos).T), y)


def laplacian_shot(X: NDArray, y: NDArray, text: NDArray | None = None, knn: int = 3, lam: float = 0.7,
                   n_iter: int = 20) -> tuple[NDArray, NDArray]:
    C = int(y.max()) + 1
    Xc = _centred(X)
    Xs, protos = _rectified_prototypes(Xc, y, C)
    q = np.flatnonzero(y < 0)
    Xq = Xs[q]
    # unary: squared distances to the rectified prototypes, per row shifted so its minimum is 0
    A = (Xq ** 2).sum(1)[:, None] - 2 * Xq @ protos.T + (protos ** 2).sum(1)[None, :]
    A -= A.min(axis=1, keepdims=True)
    _, idx = _knn(Xq, knn)
    W = sp.csr_matrix((np.ones(idx.size, np.float32), (np.repeat(np.arange(len(q)), knn), idx.ravel())),
                      shape=(len(q), len(q)))
    W = (W + W.T).tocsr()  # the Laplacian term sum_pq w_pq ||y_p - y_q||^2 differentiates to (W + W^T) Y
    Yq = _softmax(-A)
    for _ in range(n_iter):  # bound updates: Y = softmax(-a + lambda W Y)
        Yq = _softmax(-A + lam * (W @ Yq))
    P = np.zeros((len(X), C), np.float32)
    P[q] = Yq
    return _out(P, y)


def _torch():
    import torch

    return torch


def _tim_run(X: NDArray, y: NDArray, W0: NDArray, tau: float, n_iter: int, lr: float, zs: NDArray | None,
             ce_w: float = 0.1, cond_w: float = 0.1, kl_w: float = 1.0) -> NDArray:
    """TIM-GD on features ``X`` from weights ``W0`` (C, D): logits -tau/2 ||x - w_c||^2; ``zs`` (N, C) adds
    a KL(q || zs) term on the queries (TIM + text). Returns the posteriors (N, C)."""
    torch = _torch()
    lab = np.flatnonzero(y >= 0)
    q = np.flatnonzero(y < 0)
    Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32))
    Xs, Xq = Xt[lab], Xt[q]
    ys = torch.from_numpy(y[lab])
    W = torch.tensor(W0, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([W], lr=lr)
    zq = None if zs is None else torch.from_numpy(np.ascontiguousarray(zs[q], np.float32))

    def logits(Z):
        return -tau / 2 * ((Z ** 2).sum(1, keepdim=True) - 2 * Z @ W.T + (W ** 2).sum(1)[None, :])

    for _ in range(n_iter):
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(logits(Xs), ys)
        lq = torch.log_softmax(logits(Xq), dim=1)
        pq = lq.exp()
        marg = pq.mean(0)
        h_marg = -(marg * torch.log(marg + 1e-12)).sum()
        h_cond = -(pq * lq).sum(1).mean()
        loss = ce_w * ce - (h_marg - cond_w * h_cond)
        if zq is not None:
            loss = loss + kl_w * (pq * (lq - torch.log(zq + 1e-12))).sum(1).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.softmax(logits(Xt), dim=1).numpy()


def tim(X: NDArray, y: NDArray, text: NDArray | None = None, tau: float = 15.0, n_iter: int = 1000,
        lr: float = 1e-4) -> tuple[NDArray, NDArray]:
    C = int(y.max()) + 1
    Xc = _centred(X)
    return _out(_tim_run(Xc, y, _means(Xc, y, C), tau, n_iter, lr, None), y)


def pt_map(X: NDArray, y: NDArray, text: NDArray | None = None, lam: float = 10.0, n_iter: int = 20,
           alpha: float = 0.2, centre: bool = True, sinkhorn_iter: int = 30) -> tuple[NDArray, NDArray]:
    C = int(y.max()) + 1
    Xc = _centred(X) if centre else X
    lab, q = np.flatnonzero(y >= 0), np.flatnonzero(y < 0)
    M = _means(Xc, y, C)
    Ys = np.zeros((len(lab), C), np.float32)
    Ys[np.arange(len(lab)), y[lab]] = 1.0
    Xq = Xc[q]
    col = len(q) / C  # balanced classes: every class receives the same query mass
    for _ in range(n_iter):
        D = (Xq ** 2).sum(1)[:, None] - 2 * Xq @ M.T + (M ** 2).sum(1)[None, :]
        Pq = np.exp(-lam * (D - D.min(axis=1, keepdims=True)))
        for _ in range(sinkhorn_iter):  # Sinkhorn: rows sum to 1, columns to len(q) / C
            Pq *= (col / np.maximum(Pq.sum(axis=0), 1e-30))[None, :]
            Pq /= np.maximum(Pq.sum(axis=1, keepdims=True), 1e-30)
        R = np.concatenate([Ys, Pq])
        Xa = np.concatenate([Xc[lab], Xq])
        target = (R.T @ Xa) / np.maximum(R.sum(axis=0), 1e-30)[:, None]
        M = (1 - alpha) * M + alpha * target
    P = np.zeros((len(X), C), np.float32)
    P[q] = Pq
    return _out(P, y)


# ---------------------------------------------------------------- text-aware peers
def zero_shot(X: NDArray, y: NDArray, text: NDArray) -> tuple[NDArray, NDArray]:
    return _out(_softmax(100.0 * X @ _unit(text).T), y)


def tim_text(X: NDArray, y: NDArray, text: NDArray, tau: float = 15.0, n_iter: int = 1000,
             lr: float = 1e-4) -> tuple[NDArray, NDArray]:
    """TransCLIP-style: TIM on the unit (uncentred, so commensurable with the text) rows, weights from
    normalise(shot mean) + text, queries pulled to softmax(100 X @ text.T) by a KL term."""
    C = int(y.max()) + 1
    T = _unit(text)
    W0 = _unit(_unit(_means(X, y, C)) + T)
    zs = _softmax(100.0 * X @ T.T)
    return _out(_tim_run(X, y, W0, tau, n_iter, lr, zs), y)


IMAGE_PEERS = {"ncm": ncm, "logreg": logreg, "graph_lp": graph_lp, "bd_cspn": bd_cspn,
               "laplacian_shot": laplacian_shot, "tim": tim, "pt_map": pt_map}
TEXT_PEERS = {"zero_shot": zero_shot, "tim_text": tim_text}
