"""Tests of ssl_pipeline.models.losses and ssl_pipeline.models.hard_negatives.

Each loss is checked against a value written out by hand with ``math.exp`` /
``math.log`` on tiny explicit tensors, not through the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_pipeline.models.hard_negatives import HardNegativeMiner
from ssl_pipeline.models.losses import (
    LOSSES,
    AsymmetricLoss,
    ConfidenceWeightedCE,
    PSLLoss,
    SamToNeLoss,
    SimCSEPPLoss,
    UniDECLoss,
    get_loss,
    off_dropout,
    off_dropout_forward,
    psl_loss_from_scores,
)

TOL = dict(rel=1e-5, abs=1e-6)


# -- small hand-written helpers (plain python, no torch) -------------------------------


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def cos(u, v):
    u, v = unit(u), unit(v)
    return sum(a * b for a, b in zip(u, v, strict=True))


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def t(rows, grad=False):
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


# -- registry ----------------------------------------------------------------------------


def test_registry_builds_every_loss_and_lists_names_on_error():
    assert {"ce", "asl", "samtone", "simcse_pp", "unidec"} <= set(LOSSES)
    for name, cls in LOSSES.items():
        assert isinstance(get_loss(name), cls)
    assert get_loss("asl", gamma_neg=2.0).gamma_neg == 2.0
    with pytest.raises(ValueError, match="valid names: .*asl.*ce.*samtone.*simcse_pp.*unidec"):
        get_loss("nope")


# -- 1. confidence-weighted CE -------------------------------------------------------------


def test_weighted_ce_matches_hand_value():
    logits = t([[1.0, 0.0], [0.5, 1.5]], grad=True)
    target = torch.tensor([0, 0])
    w = t([1.0, 0.5])
    ce0 = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.0)))
    ce1 = -math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(1.5)))
    expected = (1.0 * ce0 + 0.5 * ce1) / 1.5
    loss = ConfidenceWeightedCE()(logits, target, w)
    assert loss.item() == pytest.approx(expected, **TOL)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # no weights: plain mean
    assert ConfidenceWeightedCE()(logits, target).item() == pytest.approx((ce0 + ce1) / 2, **TOL)


def test_weighted_ce_label_smoothing_hand_value():
    logits = t([[1.0, 0.0], [0.5, 1.5]])
    target = torch.tensor([0, 1])
    eps = 0.2

    def nll(row, c):
        return -math.log(math.exp(row[c]) / sum(math.exp(x) for x in row))

    rows = [[1.0, 0.0], [0.5, 1.5]]
    per = [(1 - eps) * nll(r, y) + eps / 2 * (nll(r, 0) + nll(r, 1)) for r, y in zip(rows, [0, 1], strict=True)]
    w = [0.25, 1.0]
    expected = (w[0] * per[0] + w[1] * per[1]) / sum(w)
    loss = ConfidenceWeightedCE(label_smoothing=eps)(logits, target, t(w))
    assert loss.item() == pytest.approx(expected, **TOL)


def test_weighted_ce_zero_weight_rows_do_not_count():
    logits = t([[1.0, 0.0], [0.5, 1.5]])
    ce = ConfidenceWeightedCE(ignore_index=-1)
    a = ce(logits, torch.tensor([0, 0]), t([1.0, 0.0]))
    b = ce(logits, torch.tensor([0, 1]), t([1.0, 0.0]))
    c = ce(logits, torch.tensor([0, -1]))
    assert a.item() == pytest.approx(b.item()) == pytest.approx(c.item())
    x = t([[1.0, 0.0]], grad=True)
    zero = ce(x, torch.tensor([0]), t([0.0]))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# -- 2. ASL -------------------------------------------------------------------------------


def asl_entry(x, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05):
    p = sigmoid(x)
    if y == 1:
        return -((1 - p) ** gamma_pos) * math.log(p)
    pm = max(p - clip, 0.0)
    return -(pm ** gamma_neg) * math.log(1 - pm)


def test_asl_matches_hand_value():
    x = [[2.0, -1.0, 0.3], [0.0, 1.0, 3.0]]
    y = [[1, 0, 0], [0, 1, 0]]
    total = sum(asl_entry(x[i][j], y[i][j]) for i in range(2) for j in range(3))
    logits = t(x, grad=True)
    loss = AsymmetricLoss()(logits, torch.tensor(y))
    assert loss.item() == pytest.approx(total / 2, **TOL)          # batchmean: / B
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # gamma_pos = 1 changes positives only, by the factor (1 - p)
    e = asl_entry(2.0, 1, gamma_pos=1.0)
    assert e == pytest.approx(-(1 - sigmoid(2.0)) * math.log(sigmoid(2.0)))
    loss1 = AsymmetricLoss(gamma_pos=1.0, reduction="sum")(t(x), torch.tensor(y))
    exp1 = sum(asl_entry(x[i][j], y[i][j], gamma_pos=1.0) for i in range(2) for j in range(3))
    assert loss1.item() == pytest.approx(exp1, **TOL)
    # clip: a negative with p < clip costs exactly nothing
    assert AsymmetricLoss(reduction="sum")(t([[-4.0]]), torch.tensor([[0]])).item() == 0.0


def test_asl_mask_and_weight():
    x = [[2.0, -1.0, 0.3], [0.0, 1.0, 3.0]]
    y = [[1, 0, 0], [0, 1, 0]]
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    w = [2.0, 0.5]
    exp_sum = sum(w[i] * asl_entry(x[i][j], y[i][j]) for i in range(2) for j in range(3) if mask[i, j])
    asl = AsymmetricLoss()
    loss = asl(t(x), torch.tensor(y), mask=mask, weight=t(w))
    assert loss.item() == pytest.approx(exp_sum / 2, **TOL)
    mean = AsymmetricLoss(reduction="mean")(t(x), torch.tensor(y), mask=mask, weight=t(w))
    assert mean.item() == pytest.approx(exp_sum / 4, **TOL)
    # masked entries: neither their logits nor their targets change the loss
    x2 = [row[:] for row in x]
    x2[0][2], x2[1][1] = -7.0, 9.0
    y2 = [[1, 0, 1], [0, 0, 0]]
    assert asl(t(x2), torch.tensor(y2), mask=mask, weight=t(w)).item() == pytest.approx(loss.item(), **TOL)
    logits = t(x, grad=True)
    asl(logits, torch.tensor(y), mask=mask).backward()
    assert logits.grad[0, 2] == 0 and logits.grad[1, 1] == 0
    per = AsymmetricLoss(reduction="none")(t(x), torch.tensor(y), mask=mask)
    assert per.shape == (2, 3) and per[0, 2] == 0


# -- 3. SamToNe ----------------------------------------------------------------------------


A = [[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]
B = [[1.0, 0.2], [-0.3, 1.0], [0.5, 0.9]]


def samtone_hand(a, b, tau, same_tower=True, not_neg=frozenset()):
    """Bidirectional SamToNe written out; ``not_neg`` holds (i, j) pairs (both orders) kept out."""
    n = len(a)

    def direction(x, y):
        total = 0.0
        for i in range(n):
            num = math.exp(cos(x[i], y[i]) / tau)
            den = num
            for j in range(n):
                if j == i or (i, j) in not_neg:
                    continue
                den += math.exp(cos(x[i], y[j]) / tau)
                if same_tower:
                    den += math.exp(cos(x[i], x[j]) / tau)
            total += -math.log(num / den)
        return total / n

    return 0.5 * (direction(a, b) + direction(b, a))


def test_samtone_matches_hand_value():
    a, b = t(A, grad=True), t(B, grad=True)
    loss = SamToNeLoss(tau=0.5)(a, b)
    assert loss.item() == pytest.approx(samtone_hand(A, B, 0.5), **TOL)
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    one_way = SamToNeLoss(tau=0.5, bidirectional=False)(t(A), t(B))
    n = 3
    exp_ab = 0.0
    for i in range(n):
        num = math.exp(cos(A[i], B[i]) / 0.5)
        den = sum(math.exp(cos(A[i], B[j]) / 0.5) for j in range(n))
        den += sum(math.exp(cos(A[i], A[j]) / 0.5) for j in range(n) if j != i)
        exp_ab -= math.log(num / den) / n
    assert one_way.item() == pytest.approx(exp_ab, **TOL)


def test_samtone_without_same_tower_terms_is_infonce():
    hand = samtone_hand(A, B, 0.5, same_tower=False)
    plain = SamToNeLoss(tau=0.5, same_tower=False)(t(A), t(B))
    assert plain.item() == pytest.approx(hand, **TOL)
    a, b = F.normalize(t(A), dim=1), F.normalize(t(B), dim=1)
    tgt = torch.arange(3)
    clip = 0.5 * (F.cross_entropy(a @ b.T / 0.5, tgt) + F.cross_entropy(b @ a.T / 0.5, tgt))
    assert plain.item() == pytest.approx(clip.item(), **TOL)
    # a margin below every similarity masks all same-tower pairs: InfoNCE again
    masked = SamToNeLoss(tau=0.5, dup_margin=-2.0)(t(A), t(B))
    assert masked.item() == pytest.approx(hand, **TOL)
    assert SamToNeLoss(tau=0.5)(t(A), t(B)).item() > hand


def test_samtone_pos_mask_and_dup_margin():
    pm = torch.zeros(3, 3, dtype=torch.bool)
    pm[0, 1] = True                                   # symmetrised inside
    loss = SamToNeLoss(tau=0.5)(t(A), t(B), pos_mask=pm)
    expected = samtone_hand(A, B, 0.5, not_neg=frozenset({(0, 1), (1, 0)}))
    assert loss.item() == pytest.approx(expected, **TOL)
    assert loss.item() != pytest.approx(samtone_hand(A, B, 0.5), **TOL)
    # near-duplicate margin 0.68: drops the same-tower pairs A(0,2), A(1,2) (cos 0.707) and
    # B(1,2) (0.698), keeps B(0,2) (0.648); cross-tower terms are untouched
    assert cos(A[0], A[2]) > 0.68 and cos(B[1], B[2]) > 0.68 > cos(B[0], B[2])
    margin = SamToNeLoss(tau=0.5, dup_margin=0.68)(t(A), t(B)).item()

    def direction(x, y, drop):
        total = 0.0
        for i in range(3):
            num = math.exp(cos(x[i], y[i]) / 0.5)
            den = sum(math.exp(cos(x[i], y[j]) / 0.5) for j in range(3))
            den += sum(math.exp(cos(x[i], x[j]) / 0.5) for j in range(3)
                       if j != i and cos(x[i], x[j]) <= drop)
            total -= math.log(num / den)
        return total / 3

    assert margin == pytest.approx(0.5 * (direction(A, B, 0.68) + direction(B, A, 0.68)), **TOL)
    assert margin < SamToNeLoss(tau=0.5)(t(A), t(B)).item()


def test_samtone_learnable_scale_gets_gradient():
    loss_fn = SamToNeLoss(tau=0.5, learn_scale=True)
    loss = loss_fn(t(A).float(), t(B).float())
    assert loss.item() == pytest.approx(samtone_hand(A, B, 0.5), rel=1e-4)
    loss.backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad != 0
    assert [n for n, _ in loss_fn.named_parameters()] == ["log_scale"]


# -- 4. SimCSE++ ---------------------------------------------------------------------------


Z1 = [[1.0, 0.5], [0.2, 1.0], [-0.4, 0.3]]
Z2 = [[0.9, 0.7], [0.1, 1.2], [-0.6, 0.1]]
ZB = [[1.0, 0.6], [0.15, 1.1], [-0.5, 0.2]]


def simcse_instance_hand(z1, z2, zb, tau=0.05, m=1.0):
    n = len(z1)
    total = 0.0
    for i in range(n):
        pos = m * cos(z1[i], z2[i]) / tau
        den = math.exp(pos) + sum(math.exp(cos(zb[i], zb[j]) / tau) for j in range(n) if j != i)
        total += -pos + math.log(den)
    return total / n


def dcl_hand(z1, z2, tau_d=5.0, eps=1e-5):
    n, d = len(z1), len(z1[0])

    def standardise(z):
        out = [[0.0] * d for _ in range(n)]
        for k in range(d):
            col = [z[r][k] for r in range(n)]
            mu = sum(col) / n
            var = sum((c - mu) ** 2 for c in col) / n
            for r in range(n):
                out[r][k] = (col[r] - mu) / math.sqrt(var + eps)
        return out

    a, b = standardise(z1), standardise(z2)
    C = [[sum(a[r][k] * b[r][kk] for r in range(n)) / (n * tau_d) for kk in range(d)] for k in range(d)]
    return sum(-C[k][k] + math.log(sum(math.exp(c) for c in C[k])) for k in range(d)) / d


def test_simcse_pp_matches_hand_value():
    z1, z2, zb = t(Z1, grad=True), t(Z2, grad=True), t(ZB, grad=True)
    loss, terms = SimCSEPPLoss()(z1, z2, zb, return_terms=True)
    inst, dcl = simcse_instance_hand(Z1, Z2, ZB), dcl_hand(Z1, Z2)
    assert terms["instance"].item() == pytest.approx(inst, rel=1e-5)
    assert terms["dcl"].item() == pytest.approx(dcl, rel=1e-5)
    assert loss.item() == pytest.approx(inst + 0.1 * dcl, rel=1e-5)
    loss.backward()
    for z in (z1, z2, zb):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    # pos_ratio m and no DCL
    m09 = SimCSEPPLoss(pos_ratio=0.9, dcl_weight=0.0)(t(Z1), t(Z2), t(ZB))
    assert m09.item() == pytest.approx(simcse_instance_hand(Z1, Z2, ZB, m=0.9), rel=1e-5)


def test_simcse_negatives_come_from_the_off_dropout_pass():
    # the denominators use z_neg only: swapping it changes the loss as the formula says
    base = SimCSEPPLoss(dcl_weight=0.0)(t(Z1), t(Z2), t(ZB)).item()
    other = SimCSEPPLoss(dcl_weight=0.0)(t(Z1), t(Z2), t(Z1)).item()
    assert base != pytest.approx(other)
    assert other == pytest.approx(simcse_instance_hand(Z1, Z2, Z1), rel=1e-5)
    # without z_neg: plain SimCSE, negatives s(z1_i, z2_j) for j != i
    plain = SimCSEPPLoss(dcl_weight=0.0)(t(Z1), t(Z2)).item()
    hand = 0.0
    for i in range(3):
        pos = cos(Z1[i], Z2[i]) / 0.05
        den = math.exp(pos) + sum(math.exp(cos(Z1[i], Z2[j]) / 0.05) for j in range(3) if j != i)
        hand += (-pos + math.log(den)) / 3
    assert plain == pytest.approx(hand, rel=1e-5)


class DropPathLike(nn.Module):
    def __init__(self, drop_prob=0.5):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1) > self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.5)
        self.drop_eval = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(4)
        self.path = DropPathLike()
        self.attn = nn.MultiheadAttention(4, 1, dropout=0.5, batch_first=True)
        self.seen = {}
        self.fail = False

    def forward(self, x):
        self.seen = {n: m.training for n, m in self.named_modules() if n}
        if self.fail:
            raise RuntimeError("boom")
        h = self.path(self.drop_eval(self.drop(self.bn(self.lin(x)))))
        return h + self.attn(h[:, None], h[:, None], h[:, None])[0][:, 0]


def test_off_dropout_forward_switches_only_dropout_and_restores_modes():
    torch.manual_seed(0)
    net = Net().train()
    net.drop_eval.eval()                      # a module the user had put in eval mode
    before = {n: m.training for n, m in net.named_modules()}
    x = torch.randn(6, 4)
    y1 = off_dropout_forward(net, x)
    assert not net.seen["drop"] and not net.seen["path"] and not net.seen["attn"]
    assert net.seen["bn"] and net.seen["lin"] and net.seen["attn.out_proj"]
    assert {n: m.training for n, m in net.named_modules()} == before
    # deterministic: dropout really is off (BatchNorm in train mode uses batch stats)
    y2 = off_dropout_forward(net, x)
    assert torch.allclose(y1, y2)
    assert not torch.allclose(net(x), y1)     # dropout is back on afterwards
    # restored even when the forward raises
    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        off_dropout_forward(net, x)
    assert {n: m.training for n, m in net.named_modules()} == before
    # nested use restores each module's own previous state
    net.fail = False
    with off_dropout(net):
        with off_dropout(net):
            pass
        assert not net.drop.training
    assert {n: m.training for n, m in net.named_modules()} == before


# -- 5. PSL / UniDEC -----------------------------------------------------------------------


Q = [[1.0, 0.0], [0.0, 1.0]]
LAB = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-0.8, 0.6]]
POS = [[True, True, False, False], [False, False, True, False]]


def psl_hand(scores, pos, decoupled=True, selected=None):
    selected = selected or pos
    per_query = []
    for s, p, sel in zip(scores, pos, selected, strict=True):
        terms = []
        for j, chosen in enumerate(sel):
            if not chosen:
                continue
            if decoupled:
                den = math.exp(s[j]) + sum(math.exp(s[k]) for k in range(len(s)) if not p[k])
            else:
                den = sum(math.exp(x) for x in s)
            terms.append(-math.log(math.exp(s[j]) / den))
        if terms:
            per_query.append(sum(terms) / len(terms))
    return sum(per_query) / len(per_query)


def test_psl_matches_hand_value_and_differs_from_pal():
    tau = 0.5
    scores = [[cos(q, lab_v) / tau for lab_v in LAB] for q in Q]
    q, lab = t(Q, grad=True), t(LAB, grad=True)
    pos = torch.tensor(POS)
    loss = PSLLoss(tau=tau)(q, lab, pos)
    expected = psl_hand(scores, POS)
    # written out for query 0: positives 0 and 1, negatives 2 and 3 only
    s0 = scores[0]
    neg0 = math.exp(s0[2]) + math.exp(s0[3])
    q0 = 0.5 * (-math.log(math.exp(s0[0]) / (math.exp(s0[0]) + neg0))
                - math.log(math.exp(s0[1]) / (math.exp(s0[1]) + neg0)))
    s1 = scores[1]
    q1 = -math.log(math.exp(s1[2]) / (math.exp(s1[2]) + math.exp(s1[0]) + math.exp(s1[1]) + math.exp(s1[3])))
    assert expected == pytest.approx((q0 + q1) / 2)
    assert loss.item() == pytest.approx(expected, **TOL)
    loss.backward()
    assert q.grad.abs().sum() > 0 and lab.grad.abs().sum() > 0
    pal_hand = psl_hand(scores, POS, decoupled=False)
    pal = PSLLoss(tau=tau, decoupled=False)(t(Q), t(LAB), pos)
    assert pal.item() == pytest.approx(pal_hand, **TOL)
    assert pal.item() > loss.item() + 0.1      # PAL also counts the other positive


def test_psl_denominator_excludes_other_positives():
    s = t([[2.0, 1.5, 0.3, -0.2]], grad=True)
    pos = torch.tensor([[True, True, False, False]])
    only_first = torch.tensor([[True, False, False, False]])
    psl_loss_from_scores(s, pos, only_first).backward()
    assert s.grad[0, 1] == 0                   # the other positive is not a negative
    assert s.grad[0, 2] > 0 and s.grad[0, 3] > 0
    s2 = t([[2.0, 1.5, 0.3, -0.2]], grad=True)
    psl_loss_from_scores(s2, pos, only_first, decoupled=False).backward()
    assert s2.grad[0, 1] > 0                   # ...whereas PAL pushes it down


def test_psl_masks_queries_without_positives_and_handles_no_negatives():
    scores = [[cos(q, lab_v) / 0.5 for lab_v in LAB] for q in Q]
    base = PSLLoss(tau=0.5)(t(Q), t(LAB), torch.tensor(POS)).item()
    q3 = t(Q + [[0.3, -1.0]])
    pos3 = torch.tensor(POS + [[False] * 4])
    assert PSLLoss(tau=0.5)(q3, t(LAB), pos3).item() == pytest.approx(base, **TOL)
    assert base == pytest.approx(psl_hand(scores, POS), **TOL)
    # a query whose whole pool is positive: every term is log(1) = 0, gradient finite
    s = t([[1.0, 2.0]], grad=True)
    loss = psl_loss_from_scores(s, torch.tensor([[True, True]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(s.grad).all()
    # no positive at all: 0, still differentiable
    z = psl_loss_from_scores(t([[1.0, 2.0]], grad=True), torch.tensor([[False, False]]))
    assert z.item() == 0.0 and z.requires_grad


def test_psl_max_pos_per_query_samples_with_generator():
    tau = 0.5
    scores = [[cos(q, lab_v) / tau for lab_v in LAB] for q in Q]
    pos = torch.tensor(POS)
    options = []
    for keep in (0, 1):
        sel = [[j == keep for j in range(4)], POS[1]]
        options.append(psl_hand(scores, POS, selected=sel))
    vals = {round(PSLLoss(tau=tau, max_pos_per_query=1, seed=s)(t(Q), t(LAB), pos).item(), 9)
            for s in range(8)}
    assert vals <= {round(v, 9) for v in options} and len(vals) == 2
    a = PSLLoss(tau=tau, max_pos_per_query=1)(t(Q), t(LAB), pos, generator=torch.Generator().manual_seed(3))
    b = PSLLoss(tau=tau, max_pos_per_query=1)(t(Q), t(LAB), pos, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


def test_unidec_matches_hand_value():
    tau_de, lam = 0.5, 0.5
    W = [[0.0, 0.0], [1.0, -1.0], [0.5, 0.5], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.3]]   # L_total = 6
    pool_ids = [3, 1, 4, 5]
    H = [[0.5, 1.0], [-1.0, 0.2]]
    s_de = [[cos(q, lab_v) / tau_de for lab_v in LAB] for q in Q]
    s_clf = [[sum(h[k] * W[p][k] for k in range(2)) for p in pool_ids] for h in H]
    expected_de, expected_clf = psl_hand(s_de, POS), psl_hand(s_clf, POS)
    q_clf, w = t(H, grad=True), t(W, grad=True)
    loss, terms = UniDECLoss(lam=lam, tau_de=tau_de)(
        t(Q), t(LAB), torch.tensor(POS), q_clf=q_clf, pool_ids=torch.tensor(pool_ids),
        clf_weight=w, return_terms=True)
    assert terms["de"].item() == pytest.approx(expected_de, **TOL)
    assert terms["clf"].item() == pytest.approx(expected_clf, **TOL)
    assert loss.item() == pytest.approx(expected_de + lam * expected_clf, **TOL)
    loss.backward()
    assert q_clf.grad.abs().sum() > 0
    assert w.grad[[0, 2]].abs().sum() == 0 and w.grad[pool_ids].abs().sum() > 0   # only pooled rows
    # an owned classifier matrix, initialised from the same W, gives the same value
    owned = UniDECLoss(num_labels=6, clf_dim=2, lam=lam, tau_de=tau_de).double()
    owned.init_classifier_from(t(W))
    again = owned(t(Q), t(LAB), torch.tensor(POS), q_clf=t(H), pool_ids=torch.tensor(pool_ids))
    assert again.item() == pytest.approx(loss.item(), **TOL)
    again.backward()
    assert owned.classifier.weight.grad.abs().sum() > 0


# -- hard-negative miner -----------------------------------------------------------------


def angles(degs):
    return np.array([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degs], np.float32)


def test_miner_returns_true_nearest_non_positive_labels():
    labels = angles([0, 10, 25, 45, 70, 100, 150, 200])
    queries = angles([0, 30, 95])
    positives = [np.array([0]), np.array([2, 3]), np.array([])]
    miner = HardNegativeMiner(refresh_every=3)
    assert miner.should_refresh(0) and not miner.should_refresh(1) and miner.should_refresh(3)
    miner.refresh(labels)
    assert miner.n_refreshes_ == 1 and miner.index_kind_ == "flat"
    neg = miner.mine(queries, positives, n_neg=3)
    # query 0 deg: 10, 25, 45 (0 is positive); query 30 deg: 10 (20 away), 0 (30), 70 (40);
    # query 95 deg (no positive): 100 (5 away), 70 (25), 45 (50)
    assert neg.tolist() == [[1, 2, 3], [1, 0, 4], [5, 4, 3]]
    assert miner.last_stats_["hit_rate"] == pytest.approx(1.0)   # both queries with positives
    assert miner.last_stats_["r_precision"] == pytest.approx(1.0)
    # exclude_top skips the nearest non-positive
    neg2 = HardNegativeMiner(exclude_top=1).refresh(labels).mine(queries[:1], positives[:1], n_neg=2)
    assert neg2.tolist() == [[2, 3]]
    # asking for more than the label space has pads with -1 and never repeats a positive
    short = miner.mine(queries[:1], [np.arange(6)], n_neg=4)
    assert short.tolist() == [[6, 7, -1, -1]]
    miner.refresh(labels)
    assert miner.n_refreshes_ == 2
    with pytest.raises(ValueError, match="outside"):
        miner.mine(queries[:1], [np.array([8])], n_neg=1)
    with pytest.raises(RuntimeError, match="refresh"):
        HardNegativeMiner().mine(queries, positives, n_neg=1)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_miner_never_returns_a_positive(kind):
    rng = np.random.default_rng(0)
    labels = rng.normal(size=(300, 8)).astype(np.float32)
    queries = rng.normal(size=(50, 8)).astype(np.float32)
    lab_u = labels / np.linalg.norm(labels, axis=1, keepdims=True)
    q_u = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q_u @ lab_u.T
    # positives = some of the very nearest labels, so that many must be skipped
    positives = [np.argsort(-sims[i])[rng.choice(10, size=rng.integers(0, 6), replace=False)]
                 for i in range(50)]
    miner = HardNegativeMiner(index_kind=kind).refresh(labels)
    neg = miner.mine(queries, positives, n_neg=7, chunk=16)
    assert neg.shape == (50, 7) and (neg >= 0).all()
    recall = []
    for i in range(50):
        assert not set(neg[i]) & set(positives[i].tolist())
        assert len(set(neg[i])) == 7
        truth = [j for j in np.argsort(-sims[i]) if j not in set(positives[i].tolist())][:7]
        if kind == "flat":
            assert neg[i].tolist() == truth
        recall.append(len(set(truth) & set(neg[i])) / 7)
    assert np.mean(recall) > 0.95


def test_batch_pool_builds_shared_pool_and_full_positive_mask():
    pos = [np.array([5, 2]), np.array([7])]
    hard = np.array([[7, 9, -1], [3, 2, 11]])      # 7 is q0's hard neg AND q1's positive
    pool, mask = HardNegativeMiner.batch_pool(pos, hard)
    assert pool.tolist() == [2, 3, 5, 7, 9, 11]
    assert mask.tolist() == [[True, False, True, False, False, False],
                             [False, False, False, True, False, False]]
    in_batch, m2 = HardNegativeMiner.batch_pool(pos)
    assert in_batch.tolist() == [2, 5, 7] and m2.sum() == 3
    rng = np.random.default_rng(0)
    p3, m3 = HardNegativeMiner.batch_pool(pos, hard, n_per_query=1, rng=rng, max_pos_per_query=1)
    assert len(p3) <= 4 and m3.sum(1).tolist() == [1, 1]
    # the pool feeds PSL directly
    emb = torch.randn(12, 4)
    loss = PSLLoss()(torch.randn(2, 4), emb[torch.from_numpy(pool)], torch.from_numpy(mask))
    assert torch.isfinite(loss)
