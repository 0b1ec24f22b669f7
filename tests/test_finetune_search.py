"""compt.paradigms.clip.finetune.search: AutoProg-Zero's candidates, ranks, choice and stage plans."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compt.config import ConfigError, from_dict
from compt.paradigms.clip.families import vit_member
from compt.paradigms.clip.finetune.head import ImageClassifier
from compt.paradigms.clip.finetune.proxies import ntk_score, zico_score
from compt.paradigms.clip.finetune.search import (
    AutoProgZeroConfig,
    candidates,
    choose,
    competition_ranks,
    plan_stage,
    search_stage,
    stage_step_macs,
)
from compt.paradigms.clip.finetune.sid import StageEmbedding
from compt.paradigms.clip.finetune.unfreeze import StagePlan, set_level

RES = [8, 16, 24, 32]


def test_competition_ranks_share_the_better_rank_on_ties():
    assert competition_ranks([3.0, 1.0, 1.0, 2.0], higher_is_better=False) == [4, 1, 1, 3]
    assert competition_ranks([3.0, 1.0, 1.0, 2.0], higher_is_better=True) == [1, 3, 3, 2]
    assert competition_ranks([1.0, 1.0 + 1e-9, 5.0], higher_is_better=False) == [1, 1, 3]  # within 1e-6
    assert competition_ranks([float("-inf"), -2.0], higher_is_better=True) == [2, 1]


def test_the_choice_on_a_constructed_case():
    cost = [10, 20, 30, 40]  # ranks 1 2 3 4
    ntk = [-5.0, -1.0, -2.0, -10.0]  # higher is better: ranks 3 1 2 4
    zico = [1.0, 4.0, 3.0, 2.0]  # ranks 4 1 2 3
    best, totals = choose(ntk, zico, cost)
    assert totals == [1 + 1.5 + 2, 2 + 0.5 + 0.5, 3 + 1 + 1, 4 + 2 + 1.5] and best == 1
    # Proxies that cannot tell the candidates apart: the cheapest wins; a tie goes to the first.
    assert choose([0.0] * 4, [0.0] * 4, cost)[0] == 0
    assert choose([-1.0, -2.0], [1.0, 2.0], [5, 5])[0] == 0


def test_candidates_are_current_and_next_level_by_current_and_next_resolution():
    first = candidates(None, RES, 4)
    assert first == [StagePlan(1, 8), StagePlan(2, 8), StagePlan(1, 16), StagePlan(2, 16)]
    assert candidates(StagePlan(2, 16), RES, 4) == [
        StagePlan(2, 16), StagePlan(3, 16), StagePlan(2, 24), StagePlan(3, 24),
    ]  # fmt: skip
    assert candidates(StagePlan(4, 24), RES, 4) == [StagePlan(4, 24), StagePlan(4, 32)]
    assert candidates(StagePlan(4, 32), RES, 4) == [StagePlan(4, 32)]


def _classifier(sid=False) -> ImageClassifier:
    torch.manual_seed(0)
    member = vit_member(
        "ft-test", "test", width=16, layers=4, text_width=16, text_layers=1, embed_dim=8,
        head_width=8, patch_size=4, image_size=32, context_length=8,
    )  # fmt: skip
    return ImageClassifier(member.create().visual, nn.Linear(8, 3), StageEmbedding(4, 16) if sid else None)


def _batches(cfg: AutoProgZeroConfig, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.search_batch_size
    return [
        (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 3, (n,), generator=g))
        for _ in range(cfg.search_batches)
    ]


@pytest.mark.parametrize("sid", [False, True])
def test_search_stage_scores_every_candidate_and_changes_nothing(sid):
    clf = _classifier(sid)
    cfg = AutoProgZeroConfig(search_batch_size=4, sid=sid)
    set_level(clf, 1, 4)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in clf.named_parameters()}
    batches = _batches(cfg)
    choice = search_stage(clf, 0, None, batches, cfg, train_batch_size=64)
    for n, p in clf.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1] and p.grad is None, n
    assert [s.plan for s in choice.scores] == candidates(None, RES, 4)
    ntk = [s.ntk for s in choice.scores]
    zico = [s.zico for s in choice.scores]
    cost = [s.step_cost for s in choice.scores]
    assert choice.plan == choice.scores[choose(ntk, zico, cost)[0]].plan and choice.how == "search"
    # Step MACs grow with the resolution and with what is unfrozen.
    assert cost[0] < cost[1] < cost[2] < cost[3]
    # The proxies are those of the candidate's own freezing and resolution.
    set_level(clf, 2, 4)
    x16 = nn.functional.interpolate(batches[0][0], size=(16, 16), mode="bilinear", antialias=True)
    kw = {"stage_ids": torch.zeros(4, dtype=torch.long)} if sid else {}
    assert ntk[3] == pytest.approx((ntk_score(clf, x16, **kw) + _ntk_at(clf, batches[1][0], 16, kw)) / 2)
    assert choice.search_macs > sum(cost) / 64  # every candidate scored on 16 samples, at least


def _ntk_at(clf, x, size, kw):
    return ntk_score(
        clf, nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True), **kw
    )


def test_zico_of_a_candidate_matches_a_direct_call():
    clf = _classifier()
    cfg = AutoProgZeroConfig(search_batch_size=4)
    batches = _batches(cfg, seed=1)
    choice = search_stage(clf, 1, StagePlan(1, 8), batches, cfg, train_batch_size=8)
    set_level(clf, 1, 4)
    xs = [(nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True), y) for x, y in batches]
    direct = zico_score(clf, xs[2:4], lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    assert choice.scores[0].plan == StagePlan(1, 8) and choice.scores[0].zico == pytest.approx(direct)


def test_measured_step_cost_is_seconds():
    clf = _classifier()
    cfg = AutoProgZeroConfig(search_batch_size=2, step_cost="measured", time_batches=2)
    assert cfg.search_batches == 6
    choice = search_stage(clf, 0, None, _batches(cfg), cfg, train_batch_size=8)
    assert all(0 < s.step_cost < 60 for s in choice.scores)


def test_stage_step_macs_is_batch_times_sample_plus_the_adamw_update():
    clf = _classifier()
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([0])
    set_level(clf, 4, 4)
    step1, sample1 = stage_step_macs(clf, StagePlan(1, 32), x, y, batch_size=10, num_stages=4)
    assert all(p.requires_grad for p in clf.parameters())  # the model's own freezing is restored
    set_level(clf, 1, 4)
    trainable = sum(p.numel() for p in clf.parameters() if p.requires_grad)
    assert step1 == 10 * sample1 + 3 * trainable
    _, sample2 = stage_step_macs(clf, StagePlan(2, 32), x, y, batch_size=10, num_stages=4)
    _, sample_low = stage_step_macs(clf, StagePlan(1, 16), x, y, batch_size=10, num_stages=4)
    assert sample_low < sample1 < sample2


def test_plan_stage_follows_the_schedule_and_ends_at_full_size():
    clf = _classifier()
    manual = AutoProgZeroConfig(schedule="manual")
    assert plan_stage(clf, 1, None, [], manual, 8).plan == StagePlan(2, 16)
    last = plan_stage(clf, 3, StagePlan(2, 16), [], AutoProgZeroConfig(), 8)
    assert (last.plan, last.how, last.search_macs) == (StagePlan(4, 32), "final", 0)
    with pytest.raises(ValueError, match="needs 4 batches"):
        plan_stage(clf, 0, None, [], AutoProgZeroConfig(), 8)
    with pytest.raises(ValueError, match="outside 0..3"):
        plan_stage(clf, 4, None, [], manual, 8)


def test_the_config_is_validated_and_loads_from_a_dict():
    cfg = from_dict(AutoProgZeroConfig, {"schedule": "manual", "sid": True}, where="finetune.autoprog_zero")
    assert cfg.schedule == "manual" and cfg.sid and cfg.search_batches == 4
    with pytest.raises(ConfigError, match="did you mean 'step_cost'"):
        from_dict(AutoProgZeroConfig, {"step_costs": "macs"})
    with pytest.raises(ValueError, match="zico_batches must be >= 2"):
        AutoProgZeroConfig(zico_batches=1)
    with pytest.raises(ValueError, match="schedule must be one of search, manual"):
        AutoProgZeroConfig(schedule="auto")


def test_a_tower_that_is_not_a_vit_is_a_clear_error():
    clf = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 8)), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="needs an open_clip ViT image tower"):
        plan_stage(clf, 0, None, [], AutoProgZeroConfig(schedule="manual"), 8)
