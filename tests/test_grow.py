"""Inverse weight initialization (compt.grow): exact slices, head alignment, Net2Net, depth maps, errors."""

from __future__ import annotations

import json
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from open_clip.model import CLIP

from compt.cli import main as cli_main
from compt.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from compt.families import get_family, get_member
from compt.grow import (
    GrowError,
    Map1D,
    depth_map,
    grow,
    grow_moments,
    grow_state_dict,
    list_depth_strategies,
    list_width_strategies,
    register_depth,
    register_width,
)

torch.set_num_threads(1)


# --- small models ---------------------------------------------------------------------------------


def vit_cfg(
    vw=16, vl=1, vhw=8, tw=16, tl=1, th=2, embed=8, v_mlp=2.0, t_mlp=2.0, image=16, patch=4, ctx=8, vocab=50
) -> dict:
    """An open_clip ViT CLIP config small enough to build in milliseconds."""
    return {
        "embed_dim": embed,
        "vision_cfg": {
            "image_size": image,
            "patch_size": patch,
            "width": vw,
            "layers": vl,
            "head_width": vhw,
            "mlp_ratio": v_mlp,
        },
        "text_cfg": {
            "context_length": ctx,
            "vocab_size": vocab,
            "width": tw,
            "heads": th,
            "layers": tl,
            "mlp_ratio": t_mlp,
        },
    }


def build(cfg: dict, seed: int = 0, zero: bool = False, trained: bool = False) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if zero:  # a zeroed student: every entry not inherited stays 0
                p.zero_()
            elif (
                trained
            ):  # a stand-in for training: no entry keeps its init value (LayerNorm ones, zero biases)
                p.add_(0.1 * torch.randn_like(p))
    return model


def _register_swin(name: str, **kw) -> str:
    from timm.models import register_model
    from timm.models.swin_transformer import _create_swin_transformer

    if not timm.models.is_model(name):

        def entry(pretrained=False, **kwargs):
            return _create_swin_transformer(name, pretrained=pretrained, **dict(kw, **kwargs))

        entry.__name__ = name
        register_model(entry)
    return name


SWIN_T = _register_swin(
    "compt_test_swin_t",
    img_size=32,
    patch_size=2,
    window_size=4,
    embed_dim=8,
    depths=(1, 2),
    num_heads=(1, 2),
    mlp_ratio=2.0,
)
SWIN_S = _register_swin(
    "compt_test_swin_s",
    img_size=32,
    patch_size=2,
    window_size=4,
    embed_dim=16,
    depths=(1, 3),
    num_heads=(2, 4),
    mlp_ratio=2.0,
)


def swin_cfg(name: str, tw=16, th=2, embed=8) -> dict:
    cfg = vit_cfg(tw=tw, th=th, embed=embed)
    cfg["vision_cfg"] = {
        "timm_model_name": name,
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "image_size": 32,
    }
    return cfg


def logits(model: CLIP, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        img, txt, scale = model(images, texts)[:3]
    return scale * img @ txt.T


def inputs(image: int = 16, vocab: int = 50, ctx: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, image, image, generator=g), torch.randint(1, vocab, (4, ctx), generator=g)


# --- the expected insert, written independently with reshapes --------------------------------------


def expected_insert(
    key: str, t: torch.Tensor, s0: torch.Tensor, sizes_t: dict, sizes_s: dict
) -> torch.Tensor:
    """The student tensor after `insert`: teacher in the leading slice of every structured block."""
    exp = s0.clone()

    def heads(sizes):
        return sizes["heads"], sizes["width"] // sizes["heads"]

    if re.search(r"(attn\.in_proj_|attn\.qkv\.)", key):
        (ht, dt), (hs, ds) = heads(sizes_t), heads(sizes_s)
        tail_t, tail_s = t.shape[1:], s0.shape[1:]
        lead = tuple(slice(0, n) for n in tail_t)
        exp.view(3, hs, ds, *tail_s)[(slice(None), slice(0, ht), slice(0, dt), *lead)] = t.view(
            3, ht, dt, *tail_t
        )
    elif re.search(r"attn\.(out_proj|proj)\.weight", key):
        (ht, dt), (hs, ds) = heads(sizes_t), heads(sizes_s)
        exp.view(s0.shape[0], hs, ds)[: t.shape[0], :ht, :dt] = t.view(t.shape[0], ht, dt)
    elif "downsample.norm" in key:
        exp.view(4, -1)[:, : t.shape[0] // 4] = t.view(4, -1)
    elif "downsample.reduction" in key:
        exp.view(s0.shape[0], 4, -1)[: t.shape[0], :, : t.shape[1] // 4] = t.view(t.shape[0], 4, -1)
    else:  # plain axes (and the per-head columns of a bias table): the leading block
        exp[tuple(slice(0, n) for n in t.shape)] = t
    return exp


def block_sizes(key: str, model_cfg_sizes: dict) -> dict:
    for prefix, sizes in model_cfg_sizes.items():
        if key.startswith(prefix):
            return sizes
    return {}


def vit_sizes(cfg: dict) -> dict:
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return {
        "visual.": {"width": v["width"], "heads": v["width"] // v["head_width"]},
        "transformer.": {"width": t["width"], "heads": t["heads"]},
    }


def teacher_key(key: str, layers_t: dict, layers_s: dict) -> str:
    """The teacher key of a student key under `duplicate` depth (layer l <- l * L_t // L_s)."""
    for prefix in layers_s:
        m = re.match(re.escape(prefix) + r"\.(\d+)\.(.*)", key)
        if m:
            return f"{prefix}.{int(m.group(1)) * layers_t[prefix] // layers_s[prefix]}.{m.group(2)}"
    return key


def vit_layers(cfg: dict) -> dict:
    return {
        "visual.transformer.resblocks": cfg["vision_cfg"]["layers"],
        "transformer.resblocks": cfg["text_cfg"]["layers"],
    }


# --- property: every inherited slice is the teacher's, everything else the student's init ---------


@st.composite
def config_pairs(draw):
    def tower():
        h_t, hw_t = draw(st.integers(1, 3)), draw(st.sampled_from([4, 8]))
        h_s, hw_s = h_t + draw(st.integers(0, 2)), hw_t * draw(st.sampled_from([1, 2]))
        l_t = draw(st.integers(1, 2))
        l_s = l_t + draw(st.integers(0, 3))
        m_t = draw(st.sampled_from([1.0, 2.0]))
        m_s = m_t + draw(st.sampled_from([0.0, 0.5, 2.0]))
        return (h_t, hw_t, l_t, m_t), (h_s, hw_s, l_s, m_s)

    (vh_t, vhw_t, vl_t, vm_t), (vh_s, vhw_s, vl_s, vm_s) = tower()
    (th_t, thw_t, tl_t, tm_t), (th_s, thw_s, tl_s, tm_s) = tower()
    e_t = draw(st.sampled_from([8, 16]))
    e_s = e_t + draw(st.sampled_from([0, 8]))
    t = vit_cfg(vh_t * vhw_t, vl_t, vhw_t, th_t * thw_t, tl_t, th_t, e_t, vm_t, tm_t)
    s = vit_cfg(vh_s * vhw_s, vl_s, vhw_s, th_s * thw_s, tl_s, th_s, e_s, vm_s, tm_s)
    return t, s


@settings(max_examples=25, deadline=None)
@given(pair=config_pairs(), seed=st.integers(0, 3))
def test_insert_copies_every_inherited_slice_exactly(pair, seed):
    t_cfg, s_cfg = pair
    teacher, student = build(t_cfg, seed, trained=True), build(s_cfg, seed + 10)
    t_sd = teacher.state_dict()
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    report = grow(teacher, student, width="insert", depth="duplicate")
    s1 = student.state_dict()
    sizes_t, sizes_s = vit_sizes(t_cfg), vit_sizes(s_cfg)
    for key in s1:
        src = teacher_key(key, vit_layers(t_cfg), vit_layers(s_cfg))
        t = t_sd[src]
        exp = expected_insert(key, t, s0[key], block_sizes(key, sizes_t), block_sizes(key, sizes_s))
        assert torch.equal(s1[key], exp), key
        info = report.tensors[key]
        assert (info.source, info.inherited, info.numel) == (src, t.numel(), s0[key].numel())
        assert info.status == ("full" if t.numel() == s0[key].numel() else "partial")


# --- q/k/v and heads: a teacher head's attention reappears in the same student head ---------------


@pytest.mark.parametrize("heads_t,heads_s,hw", [(2, 3, 8), (1, 4, 4), (3, 5, 8)])
def test_insert_keeps_each_head_in_its_head(heads_t, heads_s, hw):
    t_cfg = vit_cfg(vw=heads_t * hw, vhw=hw, tw=heads_t * hw, th=heads_t)
    s_cfg = vit_cfg(vw=heads_s * hw, vhw=hw, tw=heads_s * hw, th=heads_s, embed=16)
    teacher, student = build(t_cfg, 0, trained=True), build(s_cfg, 1, zero=True)
    grow(teacher, student, width="insert", depth="constant")
    for t_blk, s_blk in [
        (teacher.visual.transformer.resblocks[0], student.visual.transformer.resblocks[0]),
        (teacher.transformer.resblocks[0], student.transformer.resblocks[0]),
    ]:
        w_t = t_blk.attn.embed_dim
        x = torch.randn(2, 5, w_t)
        x_s = F.pad(x, (0, s_blk.attn.embed_dim - w_t))
        with torch.no_grad():
            out_t, att_t = t_blk.attn(x, x, x, need_weights=True, average_attn_weights=False)
            out_s, att_s = s_blk.attn(x_s, x_s, x_s, need_weights=True, average_attn_weights=False)
        torch.testing.assert_close(att_s[:, :heads_t], att_t, rtol=0, atol=1e-6)  # per-head attention maps
        torch.testing.assert_close(out_s[..., :w_t], out_t, rtol=0, atol=1e-6)
        assert out_s[..., w_t:].abs().max() == 0


def test_paper_compat_scrambles_heads_where_insert_does_not():
    t_cfg, s_cfg = vit_cfg(vw=16, vhw=8), vit_cfg(vw=32, vhw=8)
    teacher = build(t_cfg, trained=True)
    t_w = teacher.visual.transformer.resblocks[0].attn.in_proj_weight
    student = build(s_cfg, 1)
    grow(teacher, student, width="paper-compat", depth="constant")
    s_w = student.visual.transformer.resblocks[0].attn.in_proj_weight
    # the official top-left copy puts teacher k rows into student q rows, teacher v rows into student k rows
    assert torch.equal(s_w[16:32, :16], t_w[16:32, :16]) and torch.equal(s_w[32:48, :16], t_w[32:48])
    grow(teacher, student, width="insert", depth="constant")
    s_w = student.visual.transformer.resblocks[0].attn.in_proj_weight
    assert torch.equal(s_w[32:48, :16], t_w[16:32])  # k chunk starts at row 32 in the student


# --- paper-compat reproduces the official top-left copy -------------------------------------------


def official_top_left(t_sd: dict, s_sd: dict, double_visual_depth: bool) -> dict:
    """The official weight initialization, re-stated: every teacher tensor goes to the same key (or to
    visual layers 2i and 2i+1 when the vision depth doubles), top-left, 3-D tensors skipped."""
    out = {k: v.clone() for k, v in s_sd.items()}
    for key, t in t_sd.items():
        targets = [key]
        m = re.match(r"visual\.transformer\.resblocks\.(\d+)\.(.*)", key)
        if double_visual_depth and m:
            i = int(m.group(1))
            targets = [f"visual.transformer.resblocks.{j}.{m.group(2)}" for j in (2 * i, 2 * i + 1)]
        for k in targets:
            if t.dim() == 0:
                out[k] = t.clone()
            elif t.dim() != 3:
                out[k][tuple(slice(0, n) for n in t.shape)] = t
    return out


@pytest.mark.parametrize("double", [False, True])
def test_paper_compat_reproduces_the_official_top_left_copy(double):
    t_cfg = vit_cfg(vw=16, vl=1, tw=16, tl=2)
    s_cfg = vit_cfg(vw=32, vl=2 if double else 1, tw=24, th=3, tl=2, embed=16)
    t_sd, s_sd = build(t_cfg, trained=True).state_dict(), build(s_cfg, 1).state_dict()
    new_sd, report = grow_state_dict(t_sd, t_cfg, s_sd, s_cfg, width="paper-compat", depth="duplicate")
    ref = official_top_left(t_sd, s_sd, double)
    assert new_sd.keys() == ref.keys()
    for k in ref:
        assert torch.equal(new_sd[k], ref[k]), k
    assert report.tensors["logit_scale"].status == "full"


# --- other width strategies -----------------------------------------------------------------------


def test_interpolate_is_bilinear_and_duplicate_tiles():
    t_cfg, s_cfg = vit_cfg(vw=16, vhw=8, v_mlp=2.0), vit_cfg(vw=32, vhw=8, v_mlp=3.0, embed=16)
    teacher = build(t_cfg, trained=True)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"  # [mlp, width]: two plain axes
    t_w = teacher.state_dict()[key]
    sd, _ = grow_state_dict(
        teacher.state_dict(), t_cfg, build(s_cfg, 1).state_dict(), s_cfg, width="interpolate"
    )
    ref = F.interpolate(t_w[None, None], size=(96, 32), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(sd[key], ref)
    sd, report = grow_state_dict(
        teacher.state_dict(), t_cfg, build(s_cfg, 1).state_dict(), s_cfg, width="duplicate"
    )
    assert torch.equal(sd[key][:, :16], t_w.repeat(3, 1)[:96]) and torch.equal(
        sd[key][:, 16:], sd[key][:, :16]
    )
    qkv_t = teacher.state_dict()["visual.transformer.resblocks.0.attn.in_proj_weight"].view(3, 2, 8, 16)
    qkv_s = sd["visual.transformer.resblocks.0.attn.in_proj_weight"].view(3, 4, 8, 32)
    assert torch.equal(qkv_s[:, 2:, :, 16:], qkv_t)  # heads 2,3 repeat heads 0,1 within q, k and v
    assert all(t.status == "full" for t in report.tensors.values())


def _net2net_pair(t_cfg, s_cfg, image, **inp):
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    report = grow(teacher, student, width="net2net", seed=3)
    images, texts = inputs(image, **inp)
    torch.testing.assert_close(
        logits(student, images, texts), logits(teacher, images, texts), rtol=0, atol=1e-5
    )
    return report


def test_net2net_preserves_the_function_vit():
    t_cfg = vit_cfg(vw=16, vl=2, vhw=8, tw=16, tl=2, th=2, embed=8, v_mlp=2.0, t_mlp=1.0)
    s_cfg = vit_cfg(vw=32, vl=2, vhw=8, tw=48, tl=2, th=6, embed=16, v_mlp=1.5, t_mlp=2.5)
    report = _net2net_pair(t_cfg, s_cfg, 16)
    assert report.notes == [] and all(t.status == "full" for t in report.tensors.values())


SWIN_W2 = _register_swin(
    "compt_test_swin_w2",
    img_size=32,
    patch_size=2,
    window_size=2,
    embed_dim=16,
    depths=(1, 2),
    num_heads=(2, 4),
    mlp_ratio=3.0,
)
SWIN_W = _register_swin(
    "compt_test_swin_w",
    img_size=32,
    patch_size=2,
    window_size=4,
    embed_dim=16,
    depths=(1, 2),
    num_heads=(2, 4),
    mlp_ratio=3.0,
)


def test_net2net_preserves_the_function_swin():
    report = _net2net_pair(swin_cfg(SWIN_T), swin_cfg(SWIN_W, tw=32, th=4, embed=16), 32)
    assert report.notes == []


def test_hypercloning_preserves_the_function_and_breaks_the_symmetry():
    """Issue 13: W.repeat(n, n) / n plus +N/-N pairs: exact outputs, unequal gradients for the copies."""
    # Integer ratios on every normalized space (residual x2 / x3, embedding x2), heads x2 / x3 at the
    # same head width; the MLPs grow by non-integer ratios, which is exact (no norm over them).
    t_cfg = vit_cfg(vw=16, vl=2, vhw=8, tw=16, tl=2, th=2, embed=8, v_mlp=2.0, t_mlp=1.0)
    s_cfg = vit_cfg(vw=32, vl=2, vhw=8, tw=48, tl=2, th=6, embed=16, v_mlp=1.5, t_mlp=2.5)
    teacher = build(t_cfg, trained=True)
    clone, tiled = build(s_cfg, 1), build(s_cfg, 1)
    report = grow(teacher, clone, width="hypercloning", seed=3)
    grow(teacher, tiled, width="net2net", seed=3)  # the same copies of the residual, no noise
    assert report.notes == [] and all(t.status == "full" for t in report.tensors.values())
    images, texts = inputs()
    torch.testing.assert_close(
        logits(clone, images, texts), logits(teacher, images, texts), rtol=0, atol=1e-5
    )
    # visual.proj [width 16 -> 32 (in), embed 8 -> 16 (out)]: each row pair j, j + 16 sums to the
    # teacher's row tiled over the embedding copies; the noise is ~10 dB below the weights.
    t_proj, proj = teacher.visual.proj.detach(), clone.visual.proj.detach()
    torch.testing.assert_close(proj[:16] + proj[16:], t_proj.repeat(1, 2), rtol=0, atol=1e-6)
    noise = proj - t_proj.repeat(2, 2) / 2
    snr_db = 10 * torch.log10(t_proj.repeat(2, 2).div(2).pow(2).mean() / noise.pow(2).mean())
    assert 7 < snr_db < 13
    for model in (clone, tiled):
        img, txt, scale = model(images, texts)[:3]
        (scale * img @ txt.T).logsumexp(1).sum().backward()
    g_clone, g_tiled = clone.visual.ln_post.weight.grad, tiled.visual.ln_post.weight.grad
    torch.testing.assert_close(g_tiled[:16], g_tiled[16:])  # plain copies get the same gradient forever
    assert not torch.allclose(g_clone[:16], g_clone[16:], atol=1e-4)  # the noise pairs break that


def test_grown_moments_are_the_grown_models_gradients():
    """Issue 13 (staged training): a moment grows as the gradient of a function-preserving copy does:
    divided by the copies along the axes it produces (a width doubling halves m and quarters v)."""
    t_cfg = vit_cfg(vw=16, vl=1, vhw=8, tw=16, tl=1, th=2, embed=8, v_mlp=2.0)
    s_cfg = vit_cfg(vw=32, vl=1, vhw=8, tw=32, tl=1, th=4, embed=16, v_mlp=1.5)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    grow(teacher, student, width="net2net", seed=3)  # exact, and no noise: the copies stay symmetric
    images, texts = inputs()
    for model in (teacher, student):
        img, txt, scale = model(images, texts)[:3]
        (scale * img @ txt.T).logsumexp(1).sum().backward()
    moments = {
        n: {"exp_avg": p.grad.clone(), "exp_avg_sq": p.grad.pow(2), "step": 7}
        for n, p in teacher.named_parameters()
    }
    payload = {"model": teacher.state_dict(), "model_cfg": t_cfg, "moments": moments}
    grown = grow_moments(payload, build(s_cfg, 1), width="net2net", seed=3)
    assert grown.keys() == dict(student.named_parameters()).keys()
    for name, p in student.named_parameters():
        # fp32 sums in another order: errors of ~3e-6 on gradients of magnitude ~10 (1e-6 of the scale)
        atol = 1e-6 * max(1.0, float(p.grad.abs().max()))
        torch.testing.assert_close(grown[name]["exp_avg"], p.grad, rtol=1e-4, atol=atol, msg=name)
        torch.testing.assert_close(
            grown[name]["exp_avg_sq"].sqrt(), p.grad.abs(), rtol=1e-4, atol=atol, msg=name
        )
        assert grown[name]["step"] == 7
    ln = moments["visual.ln_post.weight"]
    torch.testing.assert_close(grown["visual.ln_post.weight"]["exp_avg"], ln["exp_avg"].repeat(2) / 2)
    torch.testing.assert_close(grown["visual.ln_post.weight"]["exp_avg_sq"], ln["exp_avg_sq"].repeat(2) / 4)
    # insert (not function-preserving): copied into the leading block as they are, zero elsewhere (MSG)
    inserted = grow_moments(payload, build(s_cfg, 1))["visual.proj"]["exp_avg"]
    assert torch.equal(inserted[:16, :8], moments["visual.proj"]["exp_avg"]) and not inserted[16:].any()
    with pytest.raises(GrowError, match="keep_moments"):
        grow_moments({"model": teacher.state_dict(), "model_cfg": t_cfg}, build(s_cfg, 1))


@pytest.mark.parametrize("depth", ["duplicate", "interval", "constant"])
@pytest.mark.parametrize(
    "width", ["insert", "duplicate", "interpolate", "paper-compat", "net2net", "hypercloning", "msg"]
)
def test_every_strategy_pair_gives_a_working_student(width, depth):
    t_cfg = vit_cfg(vw=16, vl=1, vhw=8, tw=16, tl=2, th=2, embed=8)
    s_cfg = vit_cfg(vw=48, vl=3, vhw=16, tw=32, tl=3, th=4, embed=16, v_mlp=3.0)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    report = grow(teacher, student, width=width, depth=depth)
    assert torch.isfinite(logits(student, *inputs())).all()
    for key, info in report.tensors.items():
        grown = student.state_dict()[key]
        assert (info.status == "fresh") == torch.equal(grown, s0[key]), key
        assert info.inherited <= info.numel == grown.numel()
    assert report.tensors["logit_scale"].status == "full"
    assert student.logit_scale.item() == teacher.logit_scale.item()


@pytest.mark.parametrize("family", ["vit", "swin", "tiny", "debug"])
def test_every_family_chain_grows_at_full_size(family):
    """Every link of the registered chains, at the paper's sizes: on the meta device (shapes only)."""
    members = get_family(family).members
    for a, b in zip(members, members[1:], strict=False):
        t_sd, s_sd = a.create("meta").state_dict(), b.create("meta").state_dict()
        _, report = grow_state_dict(t_sd, a.model_cfg, s_sd, b.model_cfg, in_place=True)
        assert report.tensors.keys() == s_sd.keys()
        assert all(t.status != "fresh" for t in report.tensors.values()), (a.name, b.name)
        for stack, layers in report.depth_maps.items():
            assert layers == sorted(layers) and layers[0] == 0, (a.name, b.name, stack)


# --- Swin -----------------------------------------------------------------------------------------


def test_insert_swin_per_head_per_neighbour_and_per_stage_depth():
    t_cfg, s_cfg = swin_cfg(SWIN_T), swin_cfg(SWIN_S, tw=32, th=4, embed=16)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    t_sd, s0 = teacher.state_dict(), {k: v.clone() for k, v in student.state_dict().items()}
    report = grow(teacher, student)
    assert report.depth_maps["visual.stage0"] == [0] and report.depth_maps["visual.stage1"] == [0, 0, 1]
    layers_t = {
        "visual.trunk.layers.0.blocks": 1,
        "visual.trunk.layers.1.blocks": 2,
        "transformer.resblocks": 1,
    }
    layers_s = {
        "visual.trunk.layers.0.blocks": 1,
        "visual.trunk.layers.1.blocks": 3,
        "transformer.resblocks": 1,
    }
    sizes_t = {
        "visual.trunk.layers.0.": {"width": 8, "heads": 1},
        "visual.trunk.layers.1.": {"width": 16, "heads": 2},
        "transformer.": {"width": 16, "heads": 2},
    }
    sizes_s = {
        "visual.trunk.layers.0.": {"width": 16, "heads": 2},
        "visual.trunk.layers.1.": {"width": 32, "heads": 4},
        "transformer.": {"width": 32, "heads": 4},
    }
    s1 = student.state_dict()
    for key in s1:
        src = teacher_key(key, layers_t, layers_s)
        exp = expected_insert(key, t_sd[src], s0[key], block_sizes(key, sizes_t), block_sizes(key, sizes_s))
        assert torch.equal(s1[key], exp), key


def test_insert_swin_attention_heads_line_up():
    teacher, student = (
        build(swin_cfg(SWIN_T), trained=True),
        build(swin_cfg(SWIN_S, tw=32, th=4, embed=16), 1, zero=True),
    )
    grow(teacher, student)
    for stage in (0, 1):
        a_t = teacher.visual.trunk.layers[stage].blocks[0].attn
        a_s = student.visual.trunk.layers[stage].blocks[0].attn
        c_t = a_t.qkv.in_features
        x = torch.randn(2, 16, c_t)  # 2 windows of 4x4 tokens
        with torch.no_grad():
            out_t, out_s = a_t(x), a_s(F.pad(x, (0, a_s.qkv.in_features - c_t)))
        torch.testing.assert_close(out_s[..., :c_t], out_t, rtol=0, atol=1e-6)


# --- depth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_t,n_s,dup,interval,constant",
    [
        (
            12,
            24,
            [i // 2 for i in range(24)],
            [i // 2 if i % 2 == 0 else None for i in range(24)],
            list(range(12)) + [None] * 12,
        ),
        (
            6,
            18,
            [i // 3 for i in range(18)],
            [i // 3 if i % 3 == 0 else None for i in range(18)],
            list(range(6)) + [None] * 12,
        ),
        (2, 3, [0, 0, 1], [0, None, 1], [0, 1, None]),
    ],
)
def test_depth_maps(n_t, n_s, dup, interval, constant):
    assert depth_map("duplicate", n_t, n_s) == dup
    assert depth_map("interval", n_t, n_s) == interval
    assert depth_map("constant", n_t, n_s) == constant


def test_depth_fresh_layers_keep_student_init():
    t_cfg, s_cfg = vit_cfg(vl=1), vit_cfg(vl=3)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    report = grow(teacher, student, depth="interval")
    key = "visual.transformer.resblocks.{}.mlp.c_fc.weight"
    assert torch.equal(student.state_dict()[key.format(1)], s0[key.format(1)])
    assert report.tensors[key.format(1)].status == "fresh" and report.tensors[key.format(0)].status == "full"


def test_none_none_keeps_the_student_init():
    """The "IFD only" ablation: width/depth "none" take nothing from the teacher, logit_scale included."""
    t_cfg, s_cfg = vit_cfg(vl=1), vit_cfg(vw=32, vl=3, embed=16)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    report = grow(teacher, student, width="none", depth="none")
    assert student.state_dict().keys() == s0.keys()
    assert all(torch.equal(v, s0[k]) for k, v in student.state_dict().items())
    assert {t.status for t in report.tensors.values()} == {"fresh"}
    assert report.summary()["params_inherited"] == 0
    assert all(layers == [None] * len(layers) for layers in report.depth_maps.values())


# --- API: checkpoints, state dicts, prefixes, registries ------------------------------------------


def test_grow_on_payloads_with_ddp_prefixes(tmp_path):
    t_cfg, s_cfg = vit_cfg(), vit_cfg(vw=32, vl=2, embed=16)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    path = save_checkpoint(
        tmp_path / "t.pt",
        {"model": {f"module._orig_mod.{k}": v for k, v in teacher.state_dict().items()}, "model_cfg": t_cfg},
    )
    payload = {"model": student.state_dict(), "model_cfg": s_cfg}
    report = grow(path, payload)
    reference = build(s_cfg, 1)
    grow(teacher, reference)
    assert all(torch.equal(payload["model"][k], v) for k, v in reference.state_dict().items())
    assert report.summary()["tensors"] == len(reference.state_dict())


def test_registries_are_extensible_and_strict():
    @register_width("test-even")
    def even(n_t, n_s, ctx):  # student entry 2j <- teacher entry j, odd entries keep their init
        j = torch.arange(n_s)
        return Map1D.select((j // 2).clamp(max=n_t - 1), (j % 2 == 0) & (j // 2 < n_t))

    @register_depth("test-last")
    def last(n_t, n_s):
        return [n_t - 1] * n_s

    assert "test-even" in list_width_strategies() and "test-last" in list_depth_strategies()
    t_cfg, s_cfg = vit_cfg(vl=2), vit_cfg(vw=32, vl=3, embed=16)
    teacher, student = build(t_cfg, trained=True), build(s_cfg, 1)
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    report = grow(teacher, student, width="test-even", depth="test-last")
    assert report.depth_maps["visual"] == [1, 1, 1]
    key = "visual.transformer.resblocks.{}.mlp.c_fc.weight"  # [mlp 32 -> 64, width 16 -> 32]
    grown, t_w = student.state_dict()[key.format(0)], teacher.state_dict()[key.format(1)]
    assert torch.equal(grown[::2, ::2], t_w) and torch.equal(grown[1::2], s0[key.format(0)][1::2])
    assert report.tensors[key.format(0)].fraction == 0.25
    with pytest.raises(ValueError, match="already registered"):
        register_width("insert")(even)

    @register_depth("test-broken")
    def broken(n_t, n_s):
        return [n_t] * n_s

    with pytest.raises(GrowError, match="test-broken"):
        grow(teacher, student, depth="test-broken")


# --- preconditions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "t_cfg,s_cfg,match",
    [
        (vit_cfg(vw=32), vit_cfg(vw=16), r"smaller than its teacher: visual width 16 < 32"),
        (vit_cfg(tl=2), vit_cfg(tl=1), r"text layers 1 < 2"),
        (vit_cfg(embed=16), vit_cfg(embed=8), r"embed_dim 8 < 16"),
        (vit_cfg(vw=16, vhw=4), vit_cfg(vw=32, vhw=16), r"visual heads 2 < 4"),
        (vit_cfg(patch=4), vit_cfg(patch=8), r"patch sizes differ: teacher 4, student 8"),
        (
            vit_cfg(image=16),
            vit_cfg(image=32),
            r"image sizes differ: teacher 16 px, student 32 px.*interpolate_pos",
        ),
        (vit_cfg(ctx=8), vit_cfg(ctx=12), r"context lengths differ: teacher 8, student 12"),
        (vit_cfg(vocab=50), vit_cfg(vocab=60), r"vocabulary sizes differ: teacher 50, student 60"),
        (vit_cfg(), swin_cfg(SWIN_S), r"vision towers differ: the teacher is a VIT, the student a SWIN"),
        (swin_cfg(SWIN_T), swin_cfg(SWIN_W2), r"Swin layouts differ: teacher 2 stages, window table 49 rows"),
    ],
)
def test_precondition_errors(t_cfg, s_cfg, match):
    teacher, student = build(t_cfg), build(s_cfg, 1)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(GrowError, match=match):
        grow(teacher, student)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # untouched


def test_image_size_interpolation_when_asked():
    teacher, student = build(vit_cfg(image=16)), build(vit_cfg(image=32, vw=32, embed=16), 1)
    report = grow(teacher, student, interpolate_pos=True)
    assert any("resampled from a 4x4 to a 8x8 grid" in n for n in report.notes)
    assert report.tensors["visual.positional_embedding"].status == "partial"


def test_other_bad_inputs():
    teacher, student = build(vit_cfg()), build(vit_cfg(vw=32), 1)
    with pytest.raises(GrowError, match="unknown width strategy 'wide'"):
        grow(teacher, student, width="wide")
    with pytest.raises(GrowError, match="unknown depth strategy"):
        grow(teacher, student, depth="deep")
    with pytest.raises(GrowError, match="not a path"):
        grow(teacher, "student.pt")
    sd = dict(student.state_dict(), extra_head=torch.zeros(3))
    with pytest.raises(GrowError, match="no grow rule for student tensor 'extra_head'"):
        grow_state_dict(teacher.state_dict(), vit_cfg(), sd, vit_cfg(vw=32))
    t_sd = {k: v for k, v in teacher.state_dict().items() if k != "visual.class_embedding"}
    with pytest.raises(GrowError, match="teacher state dict has no tensor 'visual.class_embedding'"):
        grow_state_dict(t_sd, vit_cfg(), student.state_dict(), vit_cfg(vw=32))


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_grow_writes_a_loadable_checkpoint(tmp_path, capsys):
    teacher = get_member("debug-S")
    save_checkpoint(
        tmp_path / "t.pt",
        {
            "model": teacher.create().state_dict(),
            "model_cfg": teacher.open_clip_config(),
            "member": teacher.name,
        },
    )
    rc = cli_main(
        [
            "grow",
            "--teacher",
            str(tmp_path / "t.pt"),
            "--student",
            "debug-L",
            "--out",
            str(tmp_path / "s.pt"),
            "--width",
            "net2net",
            "--report",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 0
    assert "width=net2net depth=duplicate" in capsys.readouterr().out
    model, payload = model_from_checkpoint(tmp_path / "s.pt")
    assert payload["member"] == "debug-L" and payload["grow"]["width"] == "net2net"
    assert payload["grow"]["teacher_member"] == "debug-S" and payload["grow"]["fraction_inherited"] == 1.0
    per = json.loads((tmp_path / "r.json").read_text())["per_tensor"]
    assert per["logit_scale"]["status"] == "full"
    assert torch.equal(model.logit_scale, load_checkpoint(tmp_path / "t.pt")["model"]["logit_scale"])


def test_cli_grow_reports_errors(tmp_path, capsys):
    big = get_member("debug-L")
    save_checkpoint(
        tmp_path / "t.pt",
        {"model": big.create().state_dict(), "model_cfg": big.open_clip_config(), "member": big.name},
    )
    rc = cli_main(
        ["grow", "--teacher", str(tmp_path / "t.pt"), "--student", "debug-S", "--out", str(tmp_path / "s.pt")]
    )
    assert rc == 2
    assert "student is smaller than its teacher" in capsys.readouterr().err
    assert not (tmp_path / "s.pt").exists()
    rc = cli_main(
        ["grow", "--teacher", str(tmp_path / "missing.pt"), "--student", "debug-L", "--out", "x.pt"]
    )
    assert rc == 2 and "missing.pt does not exist" in capsys.readouterr().err
