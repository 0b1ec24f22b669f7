"""Inverse feature distillation (Eq. 1, 4): frozen teacher, normalized MSE, projection T, auto alpha."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compt.distill import (
    AutoAlpha,
    Distiller,
    alpha_schedule,
    feature_mse,
    list_alpha_schedules,
    make_projection,
    register_alpha_schedule,
)
from compt.families import get_member
from compt.paradigms import get_paradigm

CLIP = get_paradigm("clip")


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return get_member("debug-S").create()


def _batch(member_name: str = "debug-S", b: int = 3, m: int = 2):
    member = get_member(member_name)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, member.image_size, member.image_size, generator=g)
    texts = torch.randint(1, 400, (b, m, member.context_length), generator=g)
    return images, texts


def test_projection_is_identity_for_equal_dims_and_a_truncated_eye_otherwise():
    assert isinstance(make_projection(32, 32), nn.Identity)
    proj = make_projection(48, 32)
    assert isinstance(proj, nn.Linear) and proj.weight.shape == (32, 48)
    x = torch.randn(5, 48)
    torch.testing.assert_close(proj(x), x[:, :32])  # starts by reading the inherited coordinates
    proj(x).sum().backward()
    assert proj.weight.grad is not None  # learnable: trained with the student


def test_feature_mse_is_on_normalized_embeddings():
    s, t = torch.randn(6, 16), torch.randn(6, 16)
    cos = F.cosine_similarity(s, t, dim=-1)
    expected = ((2 - 2 * cos) / 16).mean()  # |a - b|^2 = 2 - 2 cos for unit vectors, mean over D
    torch.testing.assert_close(feature_mse(s, t), expected)
    torch.testing.assert_close(feature_mse(5 * s, 0.1 * t), expected)  # the norm is not distilled
    assert feature_mse(t, 3 * t).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="projection T"):
        feature_mse(torch.randn(6, 8), t)


def test_teacher_is_frozen_and_sees_the_same_batch(teacher):
    distiller = Distiller(teacher, CLIP, alpha=500)
    assert not distiller.teacher.training
    assert not any(p.requires_grad for p in distiller.teacher.parameters())
    images, texts = _batch()
    feats = distiller.teacher_features((images, texts))
    t_image, t_text = feats["image"], feats["text"]
    assert t_image.shape == (3, 32) and t_text.shape == (3, 2, 32)
    assert not t_image.requires_grad and not t_text.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(t_image, teacher.encode_image(images))
        torch.testing.assert_close(t_text[:, 1], teacher.encode_text(texts[:, 1]))


def test_teacher_runs_under_the_students_autocast(teacher):
    distiller = Distiller(teacher, CLIP)
    images, texts = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t_image = distiller.teacher_features((images, texts))["image"]
    assert t_image.dtype == torch.bfloat16


def test_fixed_alpha_loss_is_eq1_averaged_over_modalities(teacher):
    distiller = Distiller(teacher, CLIP, alpha=500, ref_dim=None)  # the literal per-dimension MSE
    s_img, s_txt = torch.randn(3, 32, requires_grad=True), torch.randn(3, 2, 32)
    t_img, t_txt = torch.randn(3, 32), torch.randn(3, 2, 32)
    out = distiller.loss(
        {"image": s_img, "text": s_txt}, {"image": t_img, "text": t_txt}, task_loss=torch.tensor(4.0)
    )
    want = 500 * (feature_mse(s_img, t_img) + feature_mse(s_txt, t_txt)) / 2
    torch.testing.assert_close(out["loss"], want)
    assert out["alpha"].item() == 500
    out["loss"].backward()
    assert s_img.grad is not None


@pytest.mark.parametrize("dim", [32, 64, 512])
def test_fixed_alpha_weighs_squared_distance_the_same_at_every_width(teacher, dim):
    """Issue 13: alpha means the paper's weight at D = 512, so every width gets alpha / 512 per unit
    of ||s - t||^2 between normalized features; ref_dim=None keeps the literal alpha * MSE."""
    g = torch.Generator().manual_seed(dim)
    s_img, s_txt = torch.randn(4, dim, generator=g), torch.randn(4, 2, dim, generator=g)
    t_img, t_txt = torch.randn(4, dim, generator=g), torch.randn(4, 2, dim, generator=g)

    def sq_distance(s, t):  # mean over rows of the squared distance of the unit vectors
        return (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).sum(-1).mean()

    want = 500 / 512 * (sq_distance(s_img, t_img) + sq_distance(s_txt, t_txt)) / 2
    feats = ({"image": s_img, "text": s_txt}, {"image": t_img, "text": t_txt})
    out = Distiller(teacher, CLIP, alpha=500).loss(*feats, task_loss=torch.tensor(4.0))
    torch.testing.assert_close(out["loss"], want)
    assert out["alpha"].item() == pytest.approx(500 * dim / 512)  # the weight on the mean MSE
    literal = Distiller(teacher, CLIP, alpha=500, ref_dim=None).loss(*feats, task_loss=torch.tensor(4.0))
    torch.testing.assert_close(literal["loss"], want * 512 / dim)  # 16x heavier at D = 32
    auto = Distiller(teacher, CLIP, alpha="auto", ratio=0.1).loss(*feats, task_loss=torch.tensor(4.0))
    assert (auto["loss"] / 4.0).item() == pytest.approx(0.1, rel=1e-5)  # a ratio needs no width scale


def test_alpha_schedules_scale_alpha_by_the_runs_progress(teacher):
    """constant (paper), linear to 0 (Knowledge Inheritance), step off (SALT): a function of the step."""
    factors = {
        name: [
            Distiller(teacher, CLIP, schedule=name, fraction=f, total_steps=10).factor(t) for t in range(10)
        ]
        for name, f in (("constant", 1.0), ("linear", 0.5), ("step", 0.3))
    }
    assert factors["constant"] == [1.0] * 10
    assert factors["linear"] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2] + [0.0] * 5)
    assert factors["step"] == [1.0] * 3 + [0.0] * 7
    distiller = Distiller(teacher, CLIP, alpha=500, schedule="linear", fraction=0.5, total_steps=10)
    feats = ({"image": torch.randn(3, 32)}, {"image": torch.randn(3, 32)})
    full = distiller.loss(*feats, task_loss=torch.tensor(4.0))
    part = distiller.loss(*feats, task_loss=torch.tensor(4.0), factor=distiller.factor(3))
    torch.testing.assert_close(part["loss"], 0.4 * full["loss"])
    assert part["alpha"].item() == pytest.approx(0.4 * full["alpha"].item())


def test_alpha_schedule_registry_is_extensible_and_strict(teacher):
    assert {"constant", "linear", "step"} <= set(list_alpha_schedules())

    @register_alpha_schedule("test-half")
    def half(progress, fraction):
        return 0.5

    assert alpha_schedule("test-half") is half
    assert Distiller(teacher, CLIP, schedule="test-half").factor(3) == 0.5
    with pytest.raises(ValueError, match="already registered"):
        register_alpha_schedule("linear")(half)
    with pytest.raises(ValueError, match="unknown alpha schedule 'cosine'; known: constant"):
        Distiller(teacher, CLIP, schedule="cosine")
    with pytest.raises(ValueError, match="fraction"):
        Distiller(teacher, CLIP, schedule="step", fraction=0.0)
    with pytest.raises(ValueError, match="reference dim"):
        Distiller(teacher, CLIP, ref_dim=0)


def test_auto_alpha_holds_the_ratio(teacher):
    distiller = Distiller(teacher, CLIP, alpha="auto", ratio=0.1)
    g = torch.Generator().manual_seed(2)
    for task_value in (5.0, 3.0, 1.5):
        s_img, s_txt = torch.randn(4, 32, generator=g), torch.randn(4, 2, 32, generator=g)
        t_img, t_txt = torch.randn(4, 32, generator=g), torch.randn(4, 2, 32, generator=g)
        task = torch.tensor(task_value)
        out = distiller.loss({"image": s_img, "text": s_txt}, {"image": t_img, "text": t_txt}, task)
        assert (out["loss"] / task).item() == pytest.approx(0.1, rel=1e-5)
        assert not out["alpha"].requires_grad


def test_smoothed_auto_alpha_resumes_from_its_state():
    a = AutoAlpha(ratio=0.1, decay=0.9)
    values = [(torch.tensor(4.0 - i * 0.1), torch.tensor(0.01 / (i + 1))) for i in range(6)]
    for task, d in values[:3]:
        a(task, d)
    b = AutoAlpha(ratio=0.5)
    b.load_state_dict(a.state_dict())
    for task, d in values[3:]:
        torch.testing.assert_close(a(task, d), b(task, d))
    assert a(torch.tensor(1.0), torch.tensor(0.0)).item() <= AutoAlpha.MAX_ALPHA


@pytest.mark.parametrize("alpha", ["half", -1.0, float("nan")])
def test_bad_alpha_is_rejected(teacher, alpha):
    with pytest.raises(ValueError, match="alpha"):
        Distiller(teacher, CLIP, alpha=alpha)


def _task(image: torch.Tensor, text: torch.Tensor, scale: float = 10.0) -> torch.Tensor:
    from compt.paradigms.clip.loss import multi_caption_clip_loss

    return multi_caption_clip_loss(image, text, torch.tensor(scale))


def test_gate_drops_ifd_once_the_student_beats_its_teacher(teacher):
    """Beyond the paper: L_IFD counts only while the student's task loss is >= the teacher's."""
    distiller = Distiller(teacher, CLIP, alpha=500, gate=True, ref_dim=None)
    images, texts = _batch(b=4)
    feats = distiller.teacher_features((images, texts))  # a random-init teacher: near chance
    t_img, t_txt = feats["image"], feats["text"]
    scale = torch.tensor(10.0)
    teacher_task = distiller.teacher_task_loss(feats, {"logit_scale": scale}, 4)
    torch.testing.assert_close(teacher_task, _task(t_img, t_txt))  # the student's temperature
    assert not teacher_task.requires_grad
    # A student whose captions match their images: task loss below the teacher's -> gate closed.
    g = torch.Generator().manual_seed(3)
    good_img = torch.randn(4, 32, generator=g, requires_grad=True)
    good_txt = good_img.detach()[:, None].repeat(1, 2, 1)
    good_task = _task(good_img, good_txt)
    assert good_task < teacher_task
    closed = distiller.loss(
        {"image": good_img, "text": good_txt}, {"image": t_img, "text": t_txt}, good_task, teacher_task
    )
    assert closed["distill_on"].item() == 0 and closed["loss"].item() == 0
    assert closed["mse_image"] > 0  # the distance is still measured and logged
    # A student whose captions are shuffled: task loss above the teacher's -> gate open, plain Eq. 1.
    bad_txt = good_txt[[1, 2, 3, 0]]
    bad_task = _task(good_img, bad_txt)
    assert bad_task > teacher_task
    opened = distiller.loss(
        {"image": good_img, "text": bad_txt}, {"image": t_img, "text": t_txt}, bad_task, teacher_task
    )
    assert opened["distill_on"].item() == 1
    want = 500 * (feature_mse(good_img, t_img) + feature_mse(bad_txt, t_txt)) / 2
    torch.testing.assert_close(opened["loss"], want)
    with pytest.raises(ValueError, match="teacher's task loss"):
        distiller.loss({"image": good_img, "text": bad_txt}, {"image": t_img, "text": t_txt}, bad_task)
    # Without the gate nothing changes: IFD always on.
    plain = Distiller(teacher, CLIP, alpha=500).loss(
        {"image": good_img, "text": good_txt}, {"image": t_img, "text": t_txt}, good_task
    )
    assert plain["distill_on"].item() == 1 and plain["loss"] > 0


def test_link_with_the_gate_trains_and_logs_it(tmp_path):
    from compt.engine.runlog import read_metrics
    from compt.engine.train import TrainConfig, train_member
    from compt.paradigms.clip.data import DataConfig

    base = dict(data=DataConfig(kind="synthetic", num_samples=64), global_batch_size=16, log_every_steps=1)
    base |= dict(save_every_steps=0, lr=1e-3)
    t = train_member(TrainConfig(member="debug-S", out_dir=str(tmp_path / "t"), steps=2, **base))
    cfg = TrainConfig(
        member="debug-L", out_dir=str(tmp_path / "s"), steps=3, teacher=str(t.final_checkpoint), **base
    )
    result = train_member(replace(cfg, distill_gate=True))
    assert result.steps == 3
    records = read_metrics(tmp_path / "s" / "metrics.jsonl", "train")
    assert len(records) == 3
    for r in records:
        assert r["distill_on"] in (0.0, 1.0) and math.isfinite(r["loss"])
        assert r["distill_on"] == float(r["loss_task"] >= r["loss_teacher"])
        assert (r["loss_ifd"] > 0) == (r["distill_on"] == 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("alpha", [500.0, "auto"])
def test_cuda_ifd_loss_does_not_sync_with_the_host(teacher, alpha):
    # Issue 17: a fixed alpha was made with torch.tensor(alpha, device=cuda), one host sync per step.
    distiller = Distiller(teacher, CLIP, alpha=alpha)
    s_img, s_txt = torch.randn(3, 32, device="cuda"), torch.randn(3, 2, 32, device="cuda")
    t_img, t_txt = torch.randn(3, 32, device="cuda"), torch.randn(3, 2, 32, device="cuda")
    feats = ({"image": s_img, "text": s_txt}, {"image": t_img, "text": t_txt})
    task = torch.full((), 4.0, device="cuda")
    distiller.loss(*feats, task_loss=task)  # first call: lazy CUDA set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = distiller.loss(*feats, task_loss=task, factor=0.5)  # a scheduled alpha: a host float
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out["loss"].device.type == "cuda" and math.isfinite(out["loss"].item())
