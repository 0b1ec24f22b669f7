"""The multi-caption CLIP loss (Eq. 2-3) against literal re-implementations of the equations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compt.paradigms.clip.loss import clip_loss, multi_caption_clip_loss


def _features(n: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, m, d, generator=g)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def _eq2_t2v(image: torch.Tensor, text: torch.Tensor, tau: float) -> float:
    """Eq. 2 written out: -sum_i sum_j log softmax over images k of cos(t_ij, v_k) / tau."""
    n, m = text.shape[0], text.shape[1]
    total = 0.0
    for i in range(n):
        for j in range(m):
            num = math.exp(_cos(text[i, j], image[i]) / tau)
            den = sum(math.exp(_cos(text[i, j], image[k]) / tau) for k in range(n))
            total -= math.log(num / den)
    return total


def _per_slot_v2t(image: torch.Tensor, text: torch.Tensor, tau: float) -> float:
    """The dual direction per caption slot j: image v_i against the N j-th captions t_{k,j}."""
    n, m = text.shape[0], text.shape[1]
    total = 0.0
    for j in range(m):
        for i in range(n):
            num = math.exp(_cos(image[i], text[i, j]) / tau)
            den = sum(math.exp(_cos(image[i], text[k, j]) / tau) for k in range(n))
            total -= math.log(num / den)
    return total


@pytest.mark.parametrize("m", [1, 2, 4])
def test_matches_eq2_eq3_written_out(m):
    n, tau = 5, 0.07
    image, text = _features(n, m, 8, seed=m)
    got = multi_caption_clip_loss(image, text, torch.tensor(1 / tau))
    # compt uses means: Eq. 2's sum over N*M terms divided by N*M, averaged with the dual (Eq. 3).
    want = (_eq2_t2v(image, text, tau) + _per_slot_v2t(image, text, tau)) / 2 / (n * m)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_one_caption_is_the_standard_clip_loss():
    image, text = _features(6, 1, 16)
    a = multi_caption_clip_loss(image, text, torch.tensor(10.0))
    b = clip_loss(F.normalize(image, dim=-1), F.normalize(text[:, 0], dim=-1), torch.tensor(10.0))
    torch.testing.assert_close(a, b)


def test_is_the_mean_of_per_slot_clip_losses():
    image, text = _features(7, 4, 16, seed=3)
    scale = torch.tensor(20.0)
    slots = [clip_loss(F.normalize(image, dim=-1), F.normalize(text[:, j], dim=-1), scale) for j in range(4)]
    torch.testing.assert_close(multi_caption_clip_loss(image, text, scale), torch.stack(slots).mean())


def test_invariant_to_feature_norms_and_differentiable_in_the_scale():
    image, text = _features(4, 3, 8, seed=5)
    scale = torch.tensor(14.0, requires_grad=True)
    image.requires_grad_(True)
    loss = multi_caption_clip_loss(image, text, scale)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0
    assert image.grad is not None and torch.isfinite(image.grad).all()
    rescaled = multi_caption_clip_loss(image.detach() * 3.7, text * 0.2, scale.detach())
    torch.testing.assert_close(rescaled, loss.detach())


def test_perfectly_aligned_features_give_a_small_loss():
    image = torch.eye(6)
    text = torch.eye(6)[:, None, :].repeat(1, 4, 1)
    aligned = multi_caption_clip_loss(image, text, torch.tensor(100.0))
    shuffled = multi_caption_clip_loss(
        image, text[torch.randperm(6, generator=torch.Generator().manual_seed(0))], torch.tensor(100.0)
    )
    assert aligned.item() < 1e-6 < shuffled.item()


def test_bad_shapes_are_named():
    image, text = _features(4, 2, 8)
    with pytest.raises(ValueError, match=r"\[B, M, D\]"):
        multi_caption_clip_loss(image, text[:, 0], torch.tensor(1.0))
    with pytest.raises(ValueError, match="disagree"):
        multi_caption_clip_loss(image[:3], text, torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_under_bf16_autocast():
    image, text = _features(16, 4, 32)
    scale = torch.tensor(30.0)
    cpu = multi_caption_clip_loss(image, text, scale)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        gpu = multi_caption_clip_loss(image.cuda().bfloat16(), text.cuda().bfloat16(), scale.cuda())
    assert gpu.dtype == torch.float32  # the loss itself is computed in float32
    assert gpu.item() == pytest.approx(cpu.item(), rel=2e-2)
