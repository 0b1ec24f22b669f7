"""Tests for compt.cost: MAC counting (attention included), parameter counts, App. C.2 training MACs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

from compt.cost import count_macs, count_params, member_cost, run_macs
from compt.families import get_family, get_member
from compt.plan import allocate_epochs, plan_chain

torch.set_num_threads(1)


# --- the counter on single layers, against hand-computed MACs -------------------------------------


def test_linear_macs_match_hand_count():
    layer = nn.Linear(24, 40)
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert count_macs(lambda: layer(x)) == 5 * 24 * 40


def test_conv_macs_match_hand_count():
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4, bias=False)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert count_macs(lambda: conv(x)) == 2 * (16 // 4) ** 2 * 3 * 4 * 4 * 8


def test_sdpa_on_cpu_is_counted():
    # FlopCounterMode alone counts CPU scaled_dot_product_attention as zero on torch 2.14.
    b, h, s_q, s_k, d, d_v = 2, 3, 7, 9, 8, 5
    q, k, v = torch.randn(b, h, s_q, d), torch.randn(b, h, s_k, d), torch.randn(b, h, s_k, d_v)
    expected = b * h * s_q * s_k * d + b * h * s_q * s_k * d_v  # Q K^T, then (softmax) V
    assert count_macs(lambda: F.scaled_dot_product_attention(q, k, v)) == expected


def test_fused_cpu_attention_kernel_is_counted():
    # Anything that calls the fused CPU kernel directly is counted by the registered formula.
    q = torch.randn(1, 2, 6, 8)
    macs = count_macs(lambda: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q))
    assert macs == 2 * (1 * 2 * 6 * 6 * 8)


@pytest.mark.parametrize("with_grad", [False, True])
def test_attention_block_macs_match_hand_count(with_grad):
    d, heads, n = 32, 2, 10
    block = ResidualAttentionBlock(d, heads, mlp_ratio=4.0).train(with_grad)
    x = torch.randn(1, n, d)
    mask = torch.full((n, n), float("-inf")).triu(1)  # causal, like the text tower: still counted in full
    with torch.set_grad_enabled(with_grad):
        macs = count_macs(lambda: block(x, attn_mask=mask))
    projections = n * (3 * d * d + d * d)  # qkv in-projection + out-projection
    mlp = n * (d * 4 * d + 4 * d * d)
    attention = 2 * n * n * d  # Q K^T and A V over all heads
    assert macs == projections + mlp + attention


def test_multihead_attention_fast_path_is_counted_and_restored():
    d, n = 16, 5
    mha = nn.MultiheadAttention(d, 2, batch_first=True).eval()
    x = torch.randn(3, n, d)
    before = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():  # eval + no_grad is where nn.MultiheadAttention takes its fused fast path
        macs = count_macs(lambda: mha(x, x, x, need_weights=False))
    assert macs == 3 * (n * 4 * d * d + 2 * n * n * d)
    assert torch.backends.mha.get_fastpath_enabled() == before


# --- parameters ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["debug-S", "tiny-M"])
def test_count_params_breakdown(name):
    member = get_member(name)
    model = member.create()
    counts = count_params(member)
    assert counts == count_params(model) == count_params(name)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision"] == sum(p.numel() for p in model.visual.parameters())
    embed = model.token_embedding.weight.numel()
    assert embed == member.text_cfg["vocab_size"] * member.text_cfg["width"]
    assert counts["text"] == counts["total"] - counts["vision"] - model.logit_scale.numel()
    assert counts["text_no_embed"] == counts["text"] - embed
    assert counts["total_no_embed"] == counts["total"] - embed
    assert counts["text_blocks"] == sum(p.numel() for p in model.transformer.parameters())


# --- per-member cost (App. C.2) ------------------------------------------------------------------


def _vit_forward_macs(member, num_captions: int) -> int:
    """Hand count of an open_clip ViT/Transformer CLIP: 1 image + num_captions captions."""

    def tower(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
        hidden = int(width * mlp_ratio)
        per_block = tokens * (4 * width * width + 2 * width * hidden) + 2 * tokens * tokens * width
        return layers * per_block

    v, t, e = member.vision_cfg, member.text_cfg, member.model_cfg["embed_dim"]
    grid = (v["image_size"] // v["patch_size"]) ** 2
    patch_embed = grid * 3 * v["patch_size"] ** 2 * v["width"]
    vision = patch_embed + tower(grid + 1, v["width"], v["layers"], v["mlp_ratio"]) + v["width"] * e
    # The text tower projects only the pooled (end-of-text) token; the token lookup is 0 MACs.
    text = tower(t["context_length"], t["width"], t["layers"], t["mlp_ratio"]) + t["width"] * e
    return vision + num_captions * text, patch_embed


@pytest.mark.parametrize("name", ["debug-S", "debug-L", "tiny-XS", "tiny-L", "ViT-T/16"])
@pytest.mark.parametrize("num_captions", [1, 4])
def test_member_forward_macs_match_hand_count(name, num_captions):
    member = get_member(name)
    cost = member_cost(member, num_captions)
    forward, patch_embed = _vit_forward_macs(member, num_captions)
    assert cost.forward_macs == forward == cost.parts["vision"] + cost.parts["text"]
    assert cost.first_layer_macs == patch_embed
    assert cost.train_macs == 3 * cost.forward_macs - cost.first_layer_macs  # Eq. 5-6
    assert cost.update_macs == 3 * cost.params["total"]  # AdamW, per optimizer step


def test_text_macs_scale_with_captions():
    one, four = member_cost("tiny-S", 1), member_cost("tiny-S", 4)
    assert four.parts["text"] == 4 * one.parts["text"]
    assert four.parts["vision"] == one.parts["vision"]


@pytest.mark.parametrize("name", ["debug-S", "tiny-S"])
def test_train_macs_equal_measured_forward_and_backward(name):
    """App. C.2's 3 x forward - first layer is what autograd really runs (real CPU model)."""
    member = get_member(name)
    cost = member_cost(member, num_captions=2)
    model = member.create().train()
    images = torch.randn(1, 3, member.image_size, member.image_size)
    texts = torch.randint(0, member.text_cfg["vocab_size"], (2, member.context_length))

    def step():
        (model.encode_image(images).sum() + model.encode_text(texts).sum()).backward()

    assert count_macs(step) == cost.train_macs


def test_swin_member_counts_attention_and_patch_embed():
    cost = member_cost("Swin-T")
    v = cost.params["vision"]
    assert v == count_params("Swin-T")["vision"]
    # Swin-T's 4x4 patch embedding: 56 x 56 patches x 48 inputs x 96 channels.
    assert cost.first_layer_macs == 56 * 56 * 48 * 96
    assert cost.parts["vision"] > 0 and cost.parts["text"] == 4 * member_cost("Swin-T", 1).parts["text"]


def test_member_cost_is_cached_and_validates():
    assert member_cost("tiny-S") is member_cost(get_member("tiny-S"))
    with pytest.raises(ValueError, match="num_captions"):
        member_cost("tiny-S", 0)


def test_run_macs_adds_teacher_forward_and_update_steps():
    s, t = member_cost("tiny-S"), member_cost("tiny-XS")
    macs = run_macs(s, samples=1000, epochs=3, batch_size=64, teacher=t)
    steps = 3 * (1000 // 64)  # the last partial batch of each epoch is dropped, as the loader does
    assert macs == steps * (64 * (s.train_macs + t.forward_macs) + s.update_macs)
    assert run_macs(s, samples=1000, epochs=3, batch_size=64) == macs - steps * 64 * t.forward_macs
    assert run_macs(s, samples=1000, epochs=0.5, batch_size=64) == 8 * (64 * s.train_macs + s.update_macs)


# --- epoch allocation (§3.1.2) -------------------------------------------------------------------


def test_allocate_epochs_shape_and_target():
    members = get_family("tiny").members
    epochs = allocate_epochs(members, 1000, target_ratio=4.0)
    assert len(epochs) == len(members) and epochs[0] == 1000
    assert all(1 <= e <= 1000 for e in epochs)
    assert epochs[1:] == sorted(epochs[1:], reverse=True)
    plan = plan_chain(members, samples=100_000, baseline_epochs=1000, epochs=epochs, batch_size=100)
    assert plan.acceleration == pytest.approx(4.0, rel=0.02)  # rounding and update MACs only


def test_allocate_epochs_end_fraction_and_monotone_in_target():
    members = get_family("tiny").members
    epochs = allocate_epochs(members, 1000, target_ratio=3.0, end_fraction=0.5)
    assert epochs[-1] == pytest.approx(epochs[1] / 2, abs=1)
    faster = allocate_epochs(members, 1000, target_ratio=5.0)
    assert all(f <= e for f, e in zip(faster, epochs, strict=False))


def test_allocate_epochs_limits():
    members = get_family("tiny").members
    assert allocate_epochs(members, 10, target_ratio=1000.0)[1:] == [1, 1, 1]  # unreachable: 1 epoch per link
    assert allocate_epochs(members, 10, target_ratio=1.0)[1] == 10  # never above the baseline
    assert allocate_epochs(members[:1], 10) == [10]
    assert allocate_epochs(members, 10, target_ratio=None) == allocate_epochs(members, 10)
    with pytest.raises(TypeError, match="members"):
        allocate_epochs(4, 10)
    with pytest.raises(ValueError, match="target_ratio"):
        allocate_epochs(members, 10, target_ratio=0.5)
    with pytest.raises(ValueError, match="end_fraction"):
        allocate_epochs(members, 10, end_fraction=0.0)
    with pytest.raises(ValueError, match="baseline_epochs"):
        allocate_epochs(members, 0)
