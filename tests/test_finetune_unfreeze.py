"""compt.paradigms.clip.finetune.unfreeze: block groups by exact path, stage plans, fresh AdamW moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compt.paradigms.clip.families import vit_member
from compt.paradigms.clip.finetune.head import ImageClassifier
from compt.paradigms.clip.finetune.unfreeze import (
    StagePlan,
    block_groups,
    block_params,
    block_paths,
    enter_stage,
    fresh_moments,
    manual_schedule,
    set_level,
    stage_of_step,
    stage_resolutions,
    trainable_blocks,
)


def _classifier(layers: int = 12) -> ImageClassifier:
    """A real open_clip ViT tower (16 px, patch 4, width 16) with ``layers`` blocks and a 3-class head."""
    torch.manual_seed(0)
    member = vit_member(
        "ft-test", "test", width=16, layers=layers, text_width=16, text_layers=1, embed_dim=8,
        head_width=8, patch_size=4, image_size=16, context_length=8,
    )  # fmt: skip
    return ImageClassifier(member.create().visual, nn.Linear(8, 3))


def _trains(clf: ImageClassifier) -> set[int]:
    return {b for b, params in enumerate(block_params(clf)) if all(p.requires_grad for _, p in params)}


def test_block_paths_are_the_exact_module_paths_in_order():
    clf = _classifier(12)
    assert block_paths(clf) == [f"visual.transformer.resblocks.{i}" for i in range(12)]


def test_a_block_owns_its_parameters_only_never_blocks_sharing_a_name_prefix():
    """The official code's ``'blocks.1' in name`` also matches blocks 10 and 11; exact paths do not."""
    clf = _classifier(12)
    per_block = block_params(clf)
    own = len(list(clf.visual.transformer.resblocks[0].parameters()))
    for b, params in enumerate(per_block):
        assert len(params) == own  # 1 would also hold 10 and 11 under substring matching
        assert all(n.startswith(f"visual.transformer.resblocks.{b}.") for n, _ in params)
    in_blocks = {n for params in per_block for n, _ in params}
    outside = {n for n, _ in clf.named_parameters()} - in_blocks
    assert outside == {
        "visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
        "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
        "head.weight", "head.bias",
    }  # fmt: skip


def test_block_groups_are_spaced_every_k_blocks():
    assert block_groups(12, 4) == [[0, 4, 8], [1, 5, 9], [2, 6, 10], [3, 7, 11]]
    assert block_groups(2, 4) == [[0], [1], [], []]  # fewer blocks than stages: later groups empty
    assert trainable_blocks(2, 12, 4) == [0, 1, 4, 5, 8, 9]
    assert trainable_blocks(4, 12, 4) == list(range(12))
    with pytest.raises(ValueError, match="outside 1..4"):
        trainable_blocks(0, 12, 4)


def test_what_trains_at_each_stage_of_the_manual_schedule():
    clf = _classifier(12)
    outside = [p for n, p in clf.named_parameters() if ".resblocks." not in n]
    expected = {1: {0, 4, 8}, 2: {0, 1, 4, 5, 8, 9}, 3: set(range(12)) - {3, 7, 11}, 4: set(range(12))}
    for plan in manual_schedule(16, 4, 4):
        set_level(clf, plan.level, 4)
        assert _trains(clf) == expected[plan.level]
        frozen = set(range(12)) - expected[plan.level]
        assert all(not p.requires_grad for b in frozen for _, p in block_params(clf)[b])
        assert all(p.requires_grad for p in outside)  # embeddings, norms, projection and head always train


def test_set_level_returns_only_the_newly_unfrozen_parameters():
    clf = _classifier(12)
    assert len(set_level(clf, 1, 4)) == 0  # everything trained before: nothing is new
    newly = set_level(clf, 2, 4)
    expected = {id(p) for b in (1, 5, 9) for _, p in block_params(clf)[b]}
    assert {id(p) for p in newly} == expected


def test_frozen_blocks_stay_bit_identical_under_adamw_with_weight_decay():
    clf = _classifier(4)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2, weight_decay=0.5)
    set_level(clf, 1, 4)  # only block 0 trains
    before = {n: p.detach().clone() for n, p in clf.named_parameters()}
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        opt.zero_grad(set_to_none=False)  # a zero (not None) grad on a frozen block would let AdamW decay it
        nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()
    for n, p in clf.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (not any(f"resblocks.{b}." in n for b in (1, 2, 3))), n


def test_newly_unfrozen_blocks_get_fresh_adamw_moments_and_the_rest_keep_theirs():
    clf = _classifier(4)
    betas = (0.9, 0.98)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, betas=betas, weight_decay=0.0)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(clf(x), y).backward()
        opt.step()

    enter_stage(clf, opt, StagePlan(1, 16), 4)
    step()
    step()
    w1 = clf.visual.transformer.resblocks[1].mlp.c_fc.weight
    w0 = clf.visual.transformer.resblocks[0].mlp.c_fc.weight
    assert w1 not in opt.state and float(opt.state[w0]["step"]) == 2
    newly = enter_stage(clf, opt, StagePlan(2, 16), 4)
    assert any(p is w1 for p in newly)
    step()
    g = w1.grad
    assert float(opt.state[w1]["step"]) == 1 and float(opt.state[w0]["step"]) == 3
    assert torch.allclose(opt.state[w1]["exp_avg"], (1 - betas[0]) * g)
    assert torch.allclose(opt.state[w1]["exp_avg_sq"], (1 - betas[1]) * g * g)


def test_fresh_moments_clears_state_that_a_block_had_and_refuses_foreign_parameters():
    clf = _classifier(4)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    nn.functional.cross_entropy(clf(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1])).backward()
    opt.step()
    block = list(clf.visual.transformer.resblocks[2].parameters())
    assert fresh_moments(opt, block) == len(block)
    assert all(p not in opt.state and p.grad is None for p in block)
    with pytest.raises(ValueError, match="not in the optimizer"):
        fresh_moments(opt, [nn.Parameter(torch.zeros(2))])


def test_stage_resolutions_run_from_a_quarter_to_full_on_the_patch_grid():
    assert stage_resolutions(32, 4, 4) == [8, 16, 24, 32]
    assert stage_resolutions(224, 16, 4) == [64, 112, 176, 224]  # 56, 168 round half up to the grid
    assert stage_resolutions(16, 8, 4) == [8, 8, 16, 16]  # never below one patch
    assert [p.level for p in manual_schedule(32, 4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="multiple of patch_size"):
        stage_resolutions(30, 4, 4)


def test_stage_of_step_splits_the_run_into_equal_stages():
    stages = [stage_of_step(s, 10, 4) for s in range(10)]
    assert stages == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # starts at floor(linspace(0, 10, 5)) = 0, 2, 5, 7
    with pytest.raises(ValueError, match="outside"):
        stage_of_step(10, 10, 4)


def test_a_tower_without_vit_blocks_is_a_clear_error():
    with pytest.raises(ValueError, match="no visual.transformer.resblocks"):
        block_paths(nn.Sequential(nn.Linear(2, 2)))
