"""LM task loss and distillation distances (compt.paradigms.lm.loss) on real tiny Llamas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compt.distill import AutoAlpha, feature_mse, make_projection
from compt.paradigms.lm.loss import feature_distance, forward_lm, logit_distance, next_token_loss
from compt.paradigms.lm.models import build_model, llama_cfg

torch.set_num_threads(1)


def _model(width, seed, heads=4):
    torch.manual_seed(seed)
    cfg = llama_cfg(
        width=width,
        layers=2,
        heads=heads,
        kv_heads=heads // 2,
        head_dim=8,
        mlp=48,
        vocab_size=61,
        context_length=16,
        tied=True,
    )
    return build_model(cfg)


TOKENS = torch.randint(0, 61, (3, 13), generator=torch.Generator().manual_seed(0))


def test_task_loss_is_transformers_own_causal_lm_loss():
    model = _model(32, 0)
    out = forward_lm(model, TOKENS)
    reference = model(input_ids=TOKENS, labels=TOKENS).loss  # HF shifts the labels itself
    torch.testing.assert_close(out.loss, reference, atol=1e-6, rtol=1e-6)
    assert out.hidden.shape == (3, 12, 32) and out.logits.shape == (3, 12, 61)
    torch.testing.assert_close(out.logits, model(input_ids=TOKENS[:, :-1]).logits)
    torch.testing.assert_close(model.lm_head(out.hidden), out.logits)  # the state the lm_head reads
    # the final hidden state is the last RMSNorm's output: unit RMS, up to the norm's eps
    rms = out.hidden.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-2, rtol=0)


def test_untrained_loss_is_near_log_vocab():
    with torch.no_grad():
        loss = forward_lm(_model(32, 1), TOKENS).loss
    assert abs(loss.item() - math.log(61)) < 0.1


def test_feature_distance_projects_a_wider_student_and_trains_only_it():
    teacher, student = _model(32, 0).eval().requires_grad_(False), _model(48, 1, heads=6)
    projection = make_projection(48, 32)
    with torch.no_grad():
        t_out = forward_lm(teacher, TOKENS)
    s_out = forward_lm(student, TOKENS)
    d = feature_distance(s_out.hidden, t_out.hidden, projection)
    # the projection starts as a truncated identity: it reads the student's first 32 coordinates
    torch.testing.assert_close(d, feature_mse(s_out.hidden[..., :32], t_out.hidden))
    d.backward()
    assert projection.weight.grad.abs().sum() > 0 and student.model.norm.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    same = forward_lm(teacher, TOKENS).hidden
    assert feature_distance(same, same, torch.nn.Identity()).item() == 0.0


def test_logit_distance_is_temperature_scaled_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    manual = sum(
        (F.softmax(t[i, j] / 2, -1) * (F.log_softmax(t[i, j] / 2, -1) - F.log_softmax(s[i, j] / 2, -1))).sum()
        for i in range(2)
        for j in range(5)
    )
    torch.testing.assert_close(logit_distance(s, t, 2.0), 4 * manual / 10)
    assert logit_distance(t, t).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="same tokenizer"):
        logit_distance(s, t[..., :6])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logit_distance(s, t, 0.0)


def test_auto_alpha_holds_the_lm_distance_at_the_ratio_of_the_task_loss():
    teacher, student = _model(32, 0).eval(), _model(32, 1)
    with torch.no_grad():
        t_out = forward_lm(teacher, TOKENS)
    s_out = forward_lm(student, TOKENS)
    d = feature_distance(s_out.hidden, t_out.hidden, torch.nn.Identity())
    alpha = AutoAlpha(0.1)(s_out.loss, d)
    torch.testing.assert_close(alpha * d, 0.1 * s_out.loss.detach())


def test_bad_windows_are_explained():
    with pytest.raises(ValueError, match=r"token windows \[B, T \+ 1\]"):
        forward_lm(_model(32, 0), TOKENS[:, :1])
    assert next_token_loss(torch.zeros(1, 2, 4), torch.tensor([[0, 3]])).item() == pytest.approx(math.log(4))
