"""MSG's growth masks (compt.grow.masks, issue 13): the teacher's function at m = 0, a plain model at 1."""

from __future__ import annotations

import pytest
import torch
from open_clip.model import CLIP
from test_grow import SWIN_S, SWIN_T, SWIN_W, build, inputs, logits, swin_cfg, vit_cfg

from compt.grow import grow
from compt.grow.masks import GrowthMask, plain_state_dict

torch.set_num_threads(1)

# Widths by non-integer ratios (24 -> 32, 24 -> 48), heads 3 -> 4 / 6 at head width 8, MLP x3,
# embedding 8 -> 16, depth 1 -> 2 / 3 (duplicate: the second copy of a teacher layer is masked).
T_CFG = vit_cfg(vw=24, vl=1, vhw=8, tw=24, tl=1, th=3, embed=8)
S_CFG = vit_cfg(vw=32, vl=2, vhw=8, tw=48, tl=3, th=6, embed=16, v_mlp=3.0)


def _grown(t_cfg=T_CFG, s_cfg=S_CFG, image=16):
    """A trained-looking teacher and an MSG student whose new weights are all non-zero."""
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1, trained=True)
    report = grow(teacher, student, width="msg", seed=3)
    return teacher, student, report, inputs(image)


def test_msg_student_is_its_teacher_at_m0_and_its_raw_self_at_m1():
    teacher, student, report, (images, texts) = _grown()
    raw = logits(student, images, texts)
    assert report.notes == [] and not torch.allclose(raw, logits(teacher, images, texts), atol=1e-2)
    masks = report.masks
    masks.ramp_steps = 4
    masks.install(student)
    assert not masks.at(0)
    torch.testing.assert_close(
        logits(student, images, texts), logits(teacher, images, texts), rtol=0, atol=1e-5
    )
    assert not masks.at(2)  # m = 0.5: somewhere in between
    half = logits(student, images, texts)
    assert not torch.allclose(half, raw, atol=1e-3) and not torch.allclose(
        half, logits(teacher, images, texts)
    )
    assert masks.at(4)  # m = 1: the masked model is the raw one
    torch.testing.assert_close(logits(student, images, texts), raw, rtol=0, atol=1e-5)
    masks.remove()
    assert type(student) is CLIP and student.state_dict().keys() == build(S_CFG).state_dict().keys()
    torch.testing.assert_close(logits(student, images, texts), raw, rtol=0, atol=1e-6)


def test_msg_masks_new_units_new_dims_and_new_layers():
    _, _, report, _ = _grown()
    axes, layers = report.masks.axes, report.masks.layers
    # a normalized space is masked where it is written; heads and MLP units where they are read
    assert [d for d, _ in axes["visual.ln_pre.weight"]] == [0] and axes["visual.ln_pre.weight"][0][
        1
    ].sum() == 8
    assert [d for d, _ in axes["visual.transformer.resblocks.0.mlp.c_proj.weight"]] == [0, 1]
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in axes  # its units are masked on read
    heads = dict(axes["transformer.resblocks.0.attn.out_proj.weight"])[1]  # 3 -> 6 heads of 8 dims
    assert heads.tolist() == [False] * 24 + [True] * 24
    assert [d for d, _ in axes["visual.proj"]] == [1]  # the embedding (L2-normalized) as written
    # depth 1 -> 2 (vision), 1 -> 3 (text): the repeated copies of layer 0 are new layers
    assert set(layers.values()) == {"visual.1", "text.1", "text.2"}
    assert "transformer.resblocks.2.mlp.c_proj.bias" in layers and "visual.ln_post.weight" not in layers
    assert "masks: 53 tensors masked, 3 new layers" in report.format()  # compt grow says where they live


def test_msg_new_weights_get_no_gradient_at_m0():
    teacher, student, report, (images, texts) = _grown()
    report.masks.install(student)
    report.masks.at(0)
    img, txt, scale = student(images, texts)[:3]
    (scale * img @ txt.T).logsumexp(1).sum().backward()
    params = dict(student.named_parameters())
    grad = params["visual.transformer.resblocks.0.mlp.c_proj.parametrizations.weight.original"].grad
    assert grad[:24, :48].abs().sum() > 0  # the teacher's block learns
    assert not grad[24:].any() and not grad[:, 48:].any()  # new residual rows and new MLP units do not
    new_layer = params["transformer.resblocks.1.attn.out_proj.parametrizations.weight.original"].grad
    assert not new_layer.any()


def test_msg_state_round_trips_and_checkpoints_hold_plain_names():
    teacher, student, report, (images, texts) = _grown()
    copy = build(S_CFG)
    copy.load_state_dict(student.state_dict())
    masks = report.masks
    masks.ramp_steps = 10
    masks.install(student)
    masks.at(3)
    sd = plain_state_dict(student)
    assert sd.keys() == copy.state_dict().keys() and all(
        torch.equal(sd[k], v) for k, v in copy.state_dict().items()
    )
    again = GrowthMask.from_state(masks.state_dict())
    again.ramp_steps = 10
    again.install(copy)
    again.at(3)
    torch.testing.assert_close(logits(copy, images, texts), logits(student, images, texts), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already installed"):
        again.install(copy)


def test_msg_fold_writes_the_masked_weights():
    """A run stopped mid-ramp: the masks are folded into the weights (exact but for LayerNorm stats)."""
    _, student, report, _ = _grown()
    masks = report.masks
    masks.ramp_steps = 2
    masks.install(student)
    masks.at(1)  # m = 0.5
    key = "visual.transformer.resblocks.0.mlp.c_proj.weight"
    raw = plain_state_dict(student)[key].clone()
    masks.remove(fold=True)
    folded = student.state_dict()[key]
    torch.testing.assert_close(folded[:24, :48], raw[:24, :48])
    torch.testing.assert_close(folded[24:, :48], 0.5 * raw[24:, :48])
    torch.testing.assert_close(folded[24:, 48:], 0.25 * raw[24:, 48:])  # a new row and a new unit
    assert type(student) is CLIP


def test_msg_preserves_a_swin_at_equal_depth_and_says_when_depth_breaks_it():
    t_cfg = swin_cfg(SWIN_T)
    teacher, student, report, (images, texts) = _grown(t_cfg, swin_cfg(SWIN_W, tw=32, th=4, embed=16), 32)
    assert report.notes == []
    report.masks.install(student)
    report.masks.at(0)
    torch.testing.assert_close(
        logits(student, images, texts), logits(teacher, images, texts), rtol=0, atol=1e-5
    )
    # stage 1: 2 -> 3 blocks, duplicate [0, 0, 1]: teacher block 1 (shifted) lands on block 2 (not)
    report = _grown(t_cfg, swin_cfg(SWIN_S, tw=32, th=4, embed=16), 32)[2]
    assert any("visual.stage1 depth 2 -> 3 moves a teacher block" in note for note in report.notes)


def test_msg_is_not_exact_when_the_head_width_changes_and_says_so():
    t_cfg, s_cfg = vit_cfg(vw=16, vhw=8), vit_cfg(vw=32, vhw=16, embed=16)
    teacher, student, report, (images, texts) = _grown(t_cfg, s_cfg)
    assert any("msg: visual head width 8 -> 16" in note for note in report.notes)
    report.masks.install(student)
    report.masks.at(0)
    assert not torch.allclose(logits(student, images, texts), logits(teacher, images, texts), atol=1e-4)


def test_other_strategies_have_no_masks():
    teacher, student = build(T_CFG, trained=True), build(S_CFG, 1)
    assert grow(teacher, student).masks is None
    same = build(T_CFG, 2)
    assert grow(teacher, same, width="msg").masks is None  # nothing new to mask
