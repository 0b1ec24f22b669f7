"""compt.paradigms.clip.finetune.proxies: NTK, ZiCo and step MACs against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compt.paradigms.clip.families import vit_member
from compt.paradigms.clip.finetune.head import ImageClassifier
from compt.paradigms.clip.finetune.proxies import (
    measured_step_s,
    ntk_score,
    proxy_weights,
    train_macs,
    zico_score,
)
from compt.paradigms.clip.finetune.sid import StageEmbedding


def _half_sq(m, x, y):
    return ((m(x) - y) ** 2).sum() / 2


def _ce(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def test_ntk_score_of_a_linear_model_matches_the_hand_computed_condition_number():
    model = nn.Linear(3, 2)
    # d(sum of outputs)/dW_kj = x_j for both outputs k, so G_i = [x_i, x_i] and (G G^T)_ij = 2 x_i . x_j
    # (the bias is not a weight matrix: left out). x1 = (1,0,0), x2 = (1,1,0): [[2, 2], [2, 4]],
    # eigenvalues 3 -+ sqrt(5), condition (3 + sqrt 5) / (3 - sqrt 5).
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    expected = -(3 + math.sqrt(5)) / (3 - math.sqrt(5))
    assert ntk_score(model, x) == pytest.approx(expected, rel=1e-9)


def test_ntk_score_is_minus_infinity_when_the_kernel_is_singular():
    x = torch.tensor([[1.0, 2.0, 0.0], [2.0, 4.0, 0.0]])  # parallel inputs: rank-1 kernel
    assert ntk_score(nn.Linear(3, 2), x) == -math.inf


def _vit_classifier(layers=2, sid=False):
    torch.manual_seed(0)
    member = vit_member(
        "ft-test", "test", width=16, layers=layers, text_width=16, text_layers=1, embed_dim=8,
        head_width=8, patch_size=4, image_size=16, context_length=8,
    )  # fmt: skip
    return ImageClassifier(member.create().visual, nn.Linear(8, 3), StageEmbedding(4, 16) if sid else None)


def test_ntk_score_of_a_vit_classifier_equals_a_per_sample_backward_loop():
    clf = _vit_classifier(sid=True)
    clf.visual.transformer.resblocks[1].requires_grad_(False)
    x = torch.randn(3, 3, 8, 8)  # half resolution: the position embedding is resized inside
    ids = torch.tensor([1, 1, 4])
    weights = list(proxy_weights(clf).values())
    rows = []
    for i in range(3):
        g = torch.autograd.grad(clf(x[i : i + 1], ids[i : i + 1]).sum(), weights)
        rows.append(torch.cat([t.reshape(-1) for t in g]).double())
    eig = torch.linalg.eigvalsh(torch.stack(rows) @ torch.stack(rows).T)
    assert ntk_score(clf, x, stage_ids=ids) == pytest.approx(-float(eig[-1] / eig[0]), rel=1e-4)
    assert all(p.grad is None for p in clf.parameters())


def test_zico_of_a_linear_model_matches_the_hand_computed_value():
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]]))
    batches = [
        (torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 1.0]])),
        (torch.tensor([[-1.0, 0.5, 0.0]]), torch.tensor([[1.0, 0.0]])),
    ]
    # 1/2 |W x - y|^2 has gradient (W x - y) x^T; the third input is 0 in both batches, so that
    # column has zero spread and is left out.
    w = model.weight.detach().numpy().astype(np.float64)
    g = np.stack([np.outer(w @ x[0].numpy() - y[0].numpy(), x[0].numpy()).ravel() for x, y in batches])
    std, mean_abs = g.std(axis=0), np.abs(g).mean(axis=0)
    keep = std > 0
    assert keep.sum() == 4
    expected = math.log((mean_abs[keep] / std[keep]).sum())
    assert zico_score(model, batches, _half_sq) == pytest.approx(expected, rel=1e-9)


def test_zico_sums_the_log_over_layers_and_ignores_frozen_ones():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batches = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]
    both = zico_score(model, batches, _ce)
    model[0].requires_grad_(False)
    last = zico_score(model, batches, _ce)
    model[0].requires_grad_(True)
    model[2].requires_grad_(False)
    first = zico_score(model, batches, _ce)
    assert both == pytest.approx(first + last, rel=1e-9)  # layers' gradients do not depend on freezing
    with pytest.raises(ValueError, match="at least 2 batches"):
        zico_score(model, batches[:1], _ce)


def test_train_macs_counts_what_the_backward_of_each_freezing_really_computes():
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))
    x, y = torch.randn(1, 4), torch.tensor([2])
    forward = 4 * 8 + 8 * 3
    # All train: forward, both weight gradients, and the input gradient of layer 2 (layer 1 needs it)
    # = 3 x forward - the first layer's forward (compt.cost's Eq. 6).
    assert train_macs(model, x, y, _ce) == 3 * forward - 4 * 8
    model[0].requires_grad_(False)  # nothing below layer 2 needs a gradient: only its weight gradient
    assert train_macs(model, x, y, _ce) == forward + 8 * 3
    model[0].requires_grad_(True)
    model[2].requires_grad_(False)  # a frozen top layer still back-propagates its input gradient
    assert train_macs(model, x, y, _ce) == forward + 8 * 3 + 4 * 8


def test_measured_step_time_leaves_gradients_alone():
    model = nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]
    assert measured_step_s(model, batches, _ce) > 0
    assert all(p.grad is None for p in model.parameters())


def test_proxies_refuse_a_model_with_nothing_to_score():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable weight matrix"):
        ntk_score(model, torch.randn(2, 3))
