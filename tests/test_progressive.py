"""AutoProg-One (compt.engine.progressive*): stages, MoGrow, sub-nets, search, cost, resume, DDP."""

from __future__ import annotations

import io
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

from compt.config import ConfigError, from_dict
from compt.cost import member_cost
from compt.engine.optim import CosineSchedule, build_optimizer
from compt.engine.progressive import (
    Progression,
    ProgressiveConfig,
    Shape,
    growth_space,
    make_divisible,
    stage_bounds,
    stage_member,
    stage_of,
)
from compt.engine.progressive_cost import assume_linear_ramp, progressive_macs, search_eval_macs, step_macs
from compt.engine.progressive_search import choose_candidate, fit_power_law, sample_candidate, supernet_keep
from compt.engine.progressive_train import carry_adamw_state, ema_decay
from compt.families import get_member
from compt.paradigms.clip.data import DataConfig, build_loader
from compt.paradigms.clip.families import ClipMember, vit_member
from compt.paradigms.clip.loss import multi_caption_clip_loss
from compt.paradigms.clip.progressive import (
    active_layers,
    build_stage,
    candidate_loss,
    encode_image,
    extract_subnet,
    grow_stage,
    resample_pos_embed,
    resize_images,
)

torch.set_num_threads(1)

CPU = torch.device("cpu")
# 4 blocks per tower, 16 px: the growth space is depths (2, 3, 3, 4), image sizes (8, 12, 12, 16).
MEMBER = vit_member("prog-4", "test", width=32, layers=4, text_width=32, text_layers=4, embed_dim=32,
                    head_width=16, patch_size=4, image_size=16, context_length=16)  # fmt: skip


def _layers(model) -> dict[str, int]:
    return {"visual": len(model.visual.transformer.resblocks), "text": len(model.transformer.resblocks)}


def _block(sd: dict, tower: str, i: int) -> dict[str, torch.Tensor]:
    prefix = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}[tower] + f".{i}."
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loss(model, images, texts):
    b, m, length = texts.shape
    text = model.encode_text(texts.reshape(b * m, length)).reshape(b, m, -1)
    return multi_caption_clip_loss(encode_image(model, images), text, model.logit_scale.exp())


def _optimizer(model) -> torch.optim.AdamW:
    return build_optimizer([model], lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, device=CPU)


# --- the growth space and the stages ---------------------------------------------------------------


def test_growth_space_follows_the_official_rounding():
    # prog/progressive.py:20-22 for VOLO: make_divisible(linspace(0.5, 1, 4) * 224, 32) and 18 layers.
    assert [make_divisible(f * 224, 32) for f in (0.5, 2 / 3, 5 / 6, 1)] == [128, 160, 192, 224]
    assert [make_divisible(f * 18, 1) for f in (0.5, 2 / 3, 5 / 6, 1)] == [9, 12, 15, 18]
    vit_b = growth_space(get_member("ViT-B/16"), 4)  # the patch grid of a ViT/16 is 16 px
    assert vit_b.depths == ((6, 6), (8, 8), (10, 10), (12, 12))
    assert vit_b.image_sizes == (112, 144, 192, 224)
    assert growth_space(get_member("ViT-L/16"), 4).depths == ((12, 6), (16, 8), (20, 10), (24, 12))
    space = growth_space(MEMBER, 4)
    assert space.depths == ((2, 2), (3, 3), (3, 3), (4, 4)) and space.image_sizes == (8, 12, 12, 16)
    assert space.full == Shape(4, 4, 16)


def test_a_links_stages_never_go_shallower_than_its_teacher():
    # ViT-S -> ViT-B keeps all 12 blocks (resolution only); ViT-B -> ViT-L grows its vision tower from 12.
    assert growth_space(get_member("ViT-B/16"), 4, get_member("ViT-S/16")).depths == ((12, 12),) * 4
    space = growth_space(get_member("ViT-L/16"), 4, get_member("ViT-B/16"))
    assert space.depths == ((12, 12), (16, 12), (20, 12), (24, 12)) and space.image_sizes == (
        112,
        144,
        192,
        224,
    )


def test_swin_members_are_refused_by_name():
    with pytest.raises(ValueError, match="Swin-T.*Use a ViT member"):
        growth_space(get_member("Swin-T"), 4)


def test_stages_are_equal_and_every_step_has_one():
    bounds = stage_bounds(10, 4)
    assert bounds == (0, 2, 5, 7, 10)
    assert [stage_of(s, bounds) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="outside the run's 10 steps"):
        stage_of(10, bounds)
    with pytest.raises(ValueError, match="3 steps cannot have 4 stages"):
        stage_bounds(3, 4)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_stages": 0}, "num_stages must be an integer >= 1"),
        ({"schedule": "auto"}, "schedule must be one of search, manual"),
        ({"search_fraction": 1.0}, "search_fraction must be in"),
        ({"search_cost": "flops"}, "search_cost must be one of macs, wall"),
        ({"optimizer_growth": "keep"}, "optimizer_growth must be one of carry, reset"),
        ({"depth": (0, 1, 2, 3)}, "depth is a manual schedule; set progressive.schedule=manual"),
        (
            {"schedule": "manual", "depth": (0, 1, 2)},
            r"one growth-space index in 0..3 per stage \(4 values\)",
        ),
        ({"schedule": "manual", "resolution": (0, 2, 1, 3)}, "must never shrink"),
        ({"schedule": "manual", "depth": (0, 1, 2, 2)}, "must end at 3"),
    ],
)
def test_bad_config_is_named(kw, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveConfig(**kw)


def test_config_loads_from_a_dict_with_did_you_mean():
    cfg = from_dict(ProgressiveConfig, {"schedule": "manual", "depth": [0, 0, 2, 3]})
    assert cfg.depth == (0, 0, 2, 3) and cfg.manual_indices("resolution") == (0, 1, 2, 3)
    with pytest.raises(ConfigError, match="did you mean 'schedule'"):
        from_dict(ProgressiveConfig, {"shedule": "manual"})


def test_a_search_needs_enough_steps_per_stage():
    with pytest.raises(ValueError, match="at least 40 steps, lower progressive.search_fraction"):
        Progression(ProgressiveConfig(), MEMBER, 36)
    Progression(ProgressiveConfig(schedule="manual"), MEMBER, 4)  # a manual schedule needs one step a stage


def test_manual_schedule_grows_only_where_depth_changes():
    cfg = ProgressiveConfig(schedule="manual", depth=(0, 0, 1, 3), resolution=(0, 1, 2, 3))
    prog = Progression(cfg, MEMBER, 40)
    assert [prog.plan(s).shape for s in (0, 10, 20, 30)] == [
        Shape(2, 2, 8), Shape(2, 2, 12), Shape(3, 3, 12), Shape(4, 4, 16)
    ]  # fmt: skip
    # Stage 1 only raises the resolution: the model goes on as it is, no growth.
    assert {s: prog.boundary(s) for s in range(40) if prog.boundary(s)} == {
        0: "build",
        20: "grow",
        30: "grow",
    }
    assert all(prog.plan(s).phase == "train" and prog.plan(s).keep is None for s in range(40))


# --- the search ------------------------------------------------------------------------------------


def test_candidates_follow_the_official_rule_and_wall_times_score_them():
    prog = Progression(ProgressiveConfig(search_cost="wall"), get_member("ViT-B/16"), 1000)
    first = prog.candidates(0)  # {min, mid, max} depth x {min, mid, max} resolution
    assert {(c.vision_layers, c.image_size) for c in first} == {
        (d, r) for d in (6, 10, 12) for r in (112, 192, 224)
    }
    assert prog.plan(0).model == Shape(12, 12, 224)  # the supernet is the deepest candidate
    seconds = {c: c.vision_layers * c.image_size**2 / 1e5 for c in first}
    seen = set()
    for step in range(prog.search_end(0)):  # 20 search steps: every candidate at least twice
        shape = prog.plan(step).shape
        prog.record_time(step, seconds[shape] + (100 if shape not in seen else 0))  # first: warm-up
        seen.add(shape)
    assert prog.costs(0) == pytest.approx(seconds)  # the warm-up step is left out
    below = Shape(10, 10, 192)  # 20% below the loss-time curve of the others: chosen
    prog.choose(0, {c: seconds[c] ** -0.5 * (0.8 if c == below else 1) for c in first})
    assert prog.train_shape(0) == below
    # Later: the current or the next resolution, and up to three depths above the current one.
    assert {(c.vision_layers, c.image_size) for c in prog.candidates(1)} == {(12, 192), (12, 224)}
    assert prog.boundary(prog.bounds[1]) == "grow" and prog.plan(prog.bounds[1]).model == Shape(12, 12, 224)
    assert prog.plan(prog.bounds[1]).keep is None  # one depth left: every candidate runs the whole supernet
    for step in range(prog.bounds[1], prog.search_end(1)):
        prog.record_time(step, prog.plan(step).shape.image_size / 100)
    prog.choose(1, dict.fromkeys(prog.candidates(1), 2.0))  # equal losses: the cheaper one
    assert prog.train_shape(1) == Shape(12, 12, 192)
    # Once depth is full only the resolution can grow.
    assert prog.candidates(2) == (Shape(12, 12, 192), Shape(12, 12, 224))


def test_search_steps_sample_every_candidate_alike_and_resume_the_same_sequence():
    cands = list("abcdefghi")
    picks = [sample_candidate(cands, i, "0/0") for i in range(27)]
    assert all(sorted(picks[r * 9 : r * 9 + 9]) == cands for r in range(3))  # each round covers all
    assert picks != cands * 3  # shuffled
    a, b = Progression(ProgressiveConfig(), MEMBER, 48), Progression(ProgressiveConfig(), MEMBER, 48, seed=1)
    again = Progression(ProgressiveConfig(), MEMBER, 48)
    assert [a.plan(s) for s in range(9)] == [again.plan(s) for s in range(9)]
    assert [a.plan(s).shape for s in range(9)] != [b.plan(s).shape for s in range(9)]


def test_supernet_sub_nets_keep_every_block_once_and_duplicates_evenly():
    assert supernet_keep(3, 6, 3) == [0, 2, 4]  # 3 -> 6 duplicates 0,0,1,1,2,2: the first copies
    assert supernet_keep(3, 6, 6) == list(range(6))
    assert supernet_keep(3, 6, 5) == [0, 1, 2, 4, 5]
    for base, depth in ((2, 4), (6, 12), (9, 12), (5, 9)):
        source = [i * base // depth for i in range(depth)]  # compt.grow's "duplicate" depth map
        for layers in range(base, depth + 1):
            kept = [source[i] for i in supernet_keep(base, depth, layers)]
            # The sub-net is itself an adjacent duplication of the base: every block, in order.
            assert sorted(kept) == kept and set(kept) == set(range(base)) and len(kept) == layers
    with pytest.raises(ValueError, match="depth <= 2 \\* base"):
        supernet_keep(2, 5, 3)


def test_fit_power_law_recovers_the_curve():
    a, b = fit_power_law([1, 2, 4, 8], [3 * t**-0.5 for t in (1, 2, 4, 8)])
    assert a == pytest.approx(3) and b == pytest.approx(-0.5)
    assert fit_power_law([5, 5], [1.0, 2.0])[1] == 0.0  # one distinct cost: no slope
    with pytest.raises(ValueError, match="positive costs and losses"):
        fit_power_law([1, 2], [0.0, 1.0])


def test_the_search_chooses_the_candidate_below_the_loss_time_curve():
    costs = {"a": 1.0, "b": 2.0, "c": 4.0, "d": 8.0}
    on_curve = {k: 2.0 * t**-0.3 for k, t in costs.items()}
    # "c" does better than the trend the candidates show: it wins, though "d" has the lowest loss.
    losses = {**on_curve, "c": on_curve["c"] * 0.97}
    result = choose_candidate(costs, losses)
    assert result.choice == "c" and result.weight == pytest.approx(-result.exponent) and result.weight > 0.25
    assert min(losses, key=losses.get) == "d"
    # Loss growing with cost: w = 0, the lowest loss wins; a diverged candidate is never chosen.
    result = choose_candidate(costs, {"a": 2.4, "b": 2.0, "c": float("nan"), "d": 3.0})
    assert result.exponent > 0 and result.weight == 0 and result.choice == "b"
    assert result.scores["c"] == math.inf
    with pytest.raises(ValueError, match="diverged"):
        choose_candidate({"a": 1.0}, {"a": float("inf")})


# --- the models ------------------------------------------------------------------------------------


def test_a_lower_resolution_runs_the_full_model_with_its_positional_embedding_interpolated():
    torch.manual_seed(0)
    model = MEMBER.create().eval()
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(encode_image(model, images), model.encode_image(images))
    small = resize_images(images, 12)
    assert small.shape == (2, 3, 12, 12) and resize_images(images, 16) is images
    flat = resize_images(torch.full((1, 3, 16, 16), 0.25), 8)
    assert torch.allclose(flat, torch.full_like(flat, 0.25))
    # Equal to open_clip's own ViT built for 12 px, carrying the resampled embedding (a 3x3 grid).
    cfg = MEMBER.open_clip_config()
    cfg["vision_cfg"]["image_size"] = 12
    twin = ClipMember("prog-4@12", "test", cfg).create().eval()
    state = model.state_dict()
    state["visual.positional_embedding"] = resample_pos_embed(state["visual.positional_embedding"], 3)
    twin.load_state_dict(state)
    assert torch.allclose(encode_image(model, small), twin.encode_image(small), atol=1e-6)
    assert model.visual.positional_embedding.shape == (17, 32)  # the parameter keeps its full size
    encode_image(model, small).sum().backward()
    assert model.visual.positional_embedding.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiple of the 4-pixel patch"):
        encode_image(model, torch.randn(1, 3, 10, 10))


def test_a_sub_net_runs_only_its_blocks_and_equals_its_extracted_model():
    stage = build_stage(MEMBER, Shape(4, 4, 16), decay=0.9, seed=0, device=CPU)
    keep = {"visual": (0, 2, 3), "text": (1, 3)}
    images, texts = torch.randn(2, 3, 12, 12), torch.randint(0, 100, (2, 16))
    with active_layers(stage.model, keep):
        assert _layers(stage.model) == {"visual": 3, "text": 2}
        out = encode_image(stage.model, images), stage.model.encode_text(texts)
        (out[0].sum() + out[1].sum()).backward()
    assert _layers(stage.model) == {"visual": 4, "text": 4}  # restored
    blocks = stage.model.visual.transformer.resblocks
    assert blocks[1].mlp.c_fc.weight.grad is None and blocks[2].mlp.c_fc.weight.grad is not None
    sub = extract_subnet(stage, MEMBER, keep, decay=0.9)
    assert _layers(sub.model) == {"visual": 3, "text": 2}
    assert sub.source["visual.transformer.resblocks.1.attn.in_proj_weight"] == (
        "visual.transformer.resblocks.2.attn.in_proj_weight"
    )
    assert torch.allclose(encode_image(sub.model, images), out[0]) and torch.allclose(
        sub.model.encode_text(texts), out[1]
    )


def _train_a_little(stage, steps: int = 3):
    opt = _optimizer(stage.model)
    loader = build_loader(DataConfig(kind="synthetic", num_samples=64), image_size=16, context_length=16,
                          global_batch_size=8)  # fmt: skip
    for _, (images, texts) in zip(range(steps), loader, strict=False):
        _loss(stage.model, images, texts).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stage.ema.update(stage.model)
    return opt


@pytest.mark.parametrize("mogrow", [True, False])
def test_growth_starts_from_the_ema_with_moments_duplicated(mogrow):
    stage = build_stage(MEMBER, Shape(2, 2, 16), decay=0.5, seed=0, device=CPU)
    opt = _train_a_little(stage)
    online, ema = stage.model.state_dict(), stage.ema.module.state_dict()
    assert not torch.equal(online["visual.proj"], ema["visual.proj"])
    grown = grow_stage(stage, MEMBER, Shape(4, 4, 16), decay=0.5, mogrow=mogrow)
    assert grown.report.depth_maps == {"visual": [0, 0, 1, 1], "text": [0, 0, 1, 1]}  # 2 -> 4 (official)
    new, new_ema = grown.model.state_dict(), grown.ema.module.state_dict()
    source = ema if mogrow else online
    for tower in ("visual", "text"):
        for i, j in enumerate([0, 0, 1, 1]):
            assert _same(_block(new, tower, i), _block(source, tower, j))
            assert _same(_block(new_ema, tower, i), _block(ema, tower, j))  # each EMA from its own EMA
    assert torch.equal(new["visual.proj"], source["visual.proj"])
    # AdamW moments follow their layers; a reset leaves the new optimizer empty.
    new_opt = _optimizer(grown.model)
    old_params, new_params = dict(stage.model.named_parameters()), dict(grown.model.named_parameters())
    assert carry_adamw_state(opt, old_params, new_opt, new_params, grown.source) == len(new_params)
    name = "visual.transformer.resblocks.{}.mlp.c_fc.weight"
    for i, j in enumerate([0, 0, 1, 1]):
        got, want = new_opt.state[new_params[name.format(i)]], opt.state[old_params[name.format(j)]]
        assert torch.equal(got["exp_avg"], want["exp_avg"]) and torch.equal(
            got["exp_avg_sq"], want["exp_avg_sq"]
        )
        assert got["exp_avg"] is not want["exp_avg"] and int(got["step"]) == 3


def test_ema_decay_is_a_half_life_in_stages():
    assert ema_decay(31_277) == pytest.approx(0.9996, abs=2e-6)  # the official decay on its own run
    decay = ema_decay(200, 0.1)
    assert decay**20 == pytest.approx(0.5)
    assert ema_decay(3, 0.1) == 0.5  # never shorter than one step


# --- cost --------------------------------------------------------------------------------------------


def test_cost_of_a_progressive_run_is_the_sum_of_its_stages():
    cfg = ProgressiveConfig(schedule="manual")
    prog = Progression(cfg, MEMBER, 40)
    cost = progressive_macs(prog, batch_size=8)
    per_stage = [10 * step_macs(MEMBER, prog.plan(s), batch_size=8) for s in (0, 10, 20, 30)]
    assert list(cost.stage_macs) == per_stage and cost.total_macs == sum(per_stage)
    assert cost.search_eval_macs == (0, 0, 0, 0)
    # The last stage is the member itself: App. C.2's step cost plus one MAC a parameter for the EMA.
    full = member_cost(MEMBER)
    assert per_stage[-1] == 10 * (8 * full.train_macs + full.update_macs + full.update_macs // 3)
    assert per_stage[0] < per_stage[1] == per_stage[2] < per_stage[3]  # stages 1 and 2 are both (3, 3, 12)
    # A chain link's teacher runs at the stage's resolution too.
    teacher = stage_member(MEMBER, Shape(2, 2, 16))
    plan = prog.plan(0)
    linked = step_macs(MEMBER, plan, batch_size=8, teacher=teacher) - step_macs(MEMBER, plan, batch_size=8)
    small_teacher = ClipMember("t@8", "test", {**teacher.open_clip_config()})
    small_teacher.model_cfg["vision_cfg"]["image_size"] = 8
    assert linked == 8 * member_cost(small_teacher).forward_macs


def test_a_plan_assumes_each_search_chooses_the_linear_ramp():
    vit_b = get_member("ViT-B/16")
    searched = assume_linear_ramp(Progression(ProgressiveConfig(), vit_b, 100_000))
    manual = Progression(ProgressiveConfig(schedule="manual"), vit_b, 100_000)
    assert [searched.train_shape(k) for k in range(4)] == [manual.train_shape(k) for k in range(4)]
    assert searched.train_shape(0) == Shape(6, 6, 112) and searched.results[0].choice == Shape(6, 6, 112)
    cost, ramp = progressive_macs(searched, batch_size=1024), progressive_macs(manual, batch_size=1024)
    assert cost.total_macs > ramp.total_macs and cost.search_eval_macs[0] > 0  # its searches are counted


# --- end to end, without the engine ------------------------------------------------------------------


class _Driver:
    """The loop's calls at AutoProg's points, around plain AdamW: what the engine will do."""

    def __init__(self, cfg: ProgressiveConfig, total_steps: int, batches, eval_batches):
        self.cfg, self.batches, self.eval_batches = cfg, batches, eval_batches
        self.prog = Progression(cfg, MEMBER, total_steps, seed=0)
        self.decay = ema_decay(self.prog.stage_steps, cfg.ema_half_life)
        self.schedule = CosineSchedule(1e-3, total_steps, 4)
        self.stage = self.opt = None
        self.macs, self.growths = 0, []

    def _replace(self, new) -> None:
        opt = _optimizer(new.model)
        if self.cfg.optimizer_growth == "carry":
            old, now = dict(self.stage.model.named_parameters()), dict(new.model.named_parameters())
            carry_adamw_state(self.opt, old, opt, now, new.source)
        self.stage, self.opt = new, opt

    def boundary(self, step: int) -> None:
        prog, kind = self.prog, self.prog.boundary(step)
        if kind == "build":
            self.stage = build_stage(MEMBER, prog.plan(0).model, decay=self.decay, seed=0, device=CPU)
            self.opt = _optimizer(self.stage.model)
        elif kind == "grow":
            before = {k: v.clone() for k, v in self.stage.ema.module.state_dict().items()}
            self._replace(grow_stage(self.stage, MEMBER, prog.plan(step).model, decay=self.decay,
                                     mogrow=self.cfg.mogrow))  # fmt: skip
            after = {k: v.clone() for k, v in self.stage.model.state_dict().items()}
            self.growths.append((step, before, after, self.stage.report))
        elif kind == "choose":
            stage = stage_of(step, prog.bounds)
            ema = self.stage.ema.module
            losses = {
                c: candidate_loss(ema, prog.sub_net(stage, c), c.image_size, self.eval_batches, _loss)
                for c in prog.candidates(stage)
            }
            prog.choose(stage, losses)
            self.macs += search_eval_macs(prog, stage, batch_size=8)
            keep = prog.extraction(stage)
            if keep is not None:
                self._replace(extract_subnet(self.stage, MEMBER, keep, decay=self.decay))

    def step(self, step: int) -> float:
        self.boundary(step)
        plan, (images, texts) = self.prog.plan(step), self.batches[step]
        assert _layers(self.stage.model) == plan.model.depth
        self.schedule.apply(self.opt, step)  # one global schedule: no re-warmup at a growth
        with active_layers(self.stage.model, plan.keep):
            loss = _loss(self.stage.model, resize_images(images, plan.shape.image_size), texts)
            loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.stage.ema.update(self.stage.model)
        self.macs += step_macs(MEMBER, plan, batch_size=8)
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {
            "model": self.stage.model.state_dict(),
            "ema": self.stage.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "progression": self.prog.state_dict(),
            "macs": self.macs,
        }

    def load_state_dict(self, state: dict, step: int) -> None:
        """Resume before ``step``'s boundary work: the model's depth follows from the step and the choices."""
        self.prog.load_state_dict(state["progression"])
        self.stage = build_stage(MEMBER, self.prog.model_at(step), decay=self.decay, seed=1, device=CPU)
        self.stage.model.load_state_dict(state["model"])
        self.stage.ema.load_state_dict(state["ema"])
        self.opt = _optimizer(self.stage.model)
        self.opt.load_state_dict(state["optimizer"])
        self.macs = state["macs"]


TOTAL = 48  # 4 stages of 12 steps: a 9-step search at stage 0, then 3 training steps


@pytest.fixture(scope="module")
def batches():
    loader = build_loader(DataConfig(kind="synthetic", num_samples=TOTAL * 8 + 16), image_size=16,
                          context_length=16, global_batch_size=8)  # fmt: skip
    out = [b for _, b in zip(range(TOTAL + 2), loader, strict=False)]
    return out[:TOTAL], out[TOTAL:]


@pytest.fixture(scope="module")
def searched(batches):
    driver = _Driver(ProgressiveConfig(search_eval_batches=2), TOTAL, *batches)
    losses = [driver.step(s) for s in range(TOTAL)]
    return driver, losses


def test_four_stages_train_end_to_end_growing_from_the_ema(searched):
    driver, losses = searched
    prog = driver.prog
    assert all(math.isfinite(x) for x in losses)
    assert prog.plan(0).phase == "search" and prog.plan(0).model == Shape(4, 4, 16)
    assert sorted(prog.results) == [s for s in range(3) if prog.is_search_stage(s)] and 0 in prog.results
    shapes = [prog.train_shape(k) for k in range(4)]
    assert shapes[-1] == Shape(4, 4, 16) and shapes == sorted(shapes)  # nothing shrinks
    assert _layers(driver.stage.model) == {"visual": 4, "text": 4}
    assert driver.growths  # stage 1 grows the extracted stage-0 model into its supernet
    for _, ema_before, grown, report in driver.growths:  # MoGrow: each grown model starts from the EMA
        for tower, source in report.depth_maps.items():
            assert source == sorted(source) and set(source) == set(range(max(source) + 1))
            for i, j in enumerate(source):
                assert _same(_block(grown, tower, i), _block(ema_before, tower, j))
    # The MACs counted step by step are the run's cost: its stages plus the searches' scoring.
    assert driver.macs == progressive_macs(prog, batch_size=8).total_macs
    # Evaluation is at full resolution, on the full member.
    images, texts = driver.eval_batches[0]
    with torch.no_grad():
        assert math.isfinite(float(_loss(driver.stage.model, images, texts)))


def test_resume_mid_search_and_across_a_growth_is_exact(searched, batches):
    driver, _ = searched
    prog = driver.prog
    # Stop mid-search, where a search is scored, where a growth is due and right after it; resume each time.
    stops = [5, prog.search_end(0), prog.bounds[1], prog.bounds[1] + 1]
    assert prog.plan(5).phase == "search"
    assert [prog.boundary(s) for s in stops[1:]] == ["choose", "grow", None]
    run, start = _Driver(driver.cfg, TOTAL, *batches), 0
    for stop in [*stops, TOTAL]:
        for s in range(start, stop):
            run.step(s)
        if stop < TOTAL:  # through a checkpoint file's bytes, into fresh objects
            buffer = io.BytesIO()
            torch.save(run.state_dict(), buffer)
            buffer.seek(0)
            run = _Driver(driver.cfg, TOTAL, *batches)
            run.load_state_dict(torch.load(buffer, weights_only=False), stop)
        start = stop
    assert run.prog.results == prog.results
    assert _same(run.stage.model.state_dict(), driver.stage.model.state_dict())
    assert _same(run.stage.ema.state_dict(), driver.stage.ema.state_dict())
    assert run.macs == driver.macs


@pytest.mark.parametrize("optimizer_growth", ["carry", "reset"])
def test_manual_schedule_trains_and_its_optimizer_growth_matters(batches, optimizer_growth):
    cfg = ProgressiveConfig(schedule="manual", mogrow=False, optimizer_growth=optimizer_growth)
    driver = _Driver(cfg, 16, *batches)
    for s in range(16):
        driver.step(s)
    assert [g[0] for g in driver.growths] == [4, 12]  # depths 2, 3, 3, 4
    steps = {int(st["step"]) for st in driver.opt.state.values()}
    assert steps == ({16} if optimizer_growth == "carry" else {4})  # moments carried since step 0, or reset


# --- DDP --------------------------------------------------------------------------------------------


def _ddp_steps(rank: int, world: int, port: int, out: str) -> None:
    """Three supernet steps, each on a different sub-net; rank r trains on its half of each batch."""
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        tdist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    stage = build_stage(MEMBER, Shape(4, 4, 16), decay=0.9, seed=0, device=CPU)

    class Forward(torch.nn.Module):  # what DDP wraps; the sub-net is chosen inside the forward
        def __init__(self, model):
            super().__init__()
            self.model, self.keep = model, None

        def forward(self, images, texts):
            with active_layers(self.model, self.keep):
                return encode_image(self.model, images), self.model.encode_text(texts)

    forward = Forward(stage.model)
    wrapped = DistributedDataParallel(forward, find_unused_parameters=True) if world > 1 else forward
    # SGD: AdamW would blow float noise in gradients that are zero in exact arithmetic (attention's key
    # bias) up to full steps; like AdamW, it skips parameters whose gradient is None.
    opt = torch.optim.SGD(stage.model.parameters(), lr=0.01, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    grads = []
    for step, keep in enumerate([(0, 2), (0, 1, 3), (0, 2)]):
        forward.keep = {"visual": keep, "text": keep}
        images, texts = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 500, (8, 16), generator=g)
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)
        image, text = wrapped(resize_images(images[mine], 12 if step % 2 else 8), texts[mine])
        (image - text).pow(2).sum(-1).mean().backward()  # a per-sample loss: DDP's mean is the full batch's
        blocks = stage.model.visual.transformer.resblocks
        grads.append([blocks[i].mlp.c_fc.weight.grad is None for i in range(4)])
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.save({"model": stage.model.state_dict(), "grads_none": grads}, Path(out) / f"rank{rank}.pt")
    if world > 1:
        tdist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_train_sub_nets_like_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = torch.multiprocessing.get_context("fork")  # the children share this process's imports
    procs = [ctx.Process(target=_ddp_steps, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    (tmp_path / "one").mkdir()
    _ddp_steps(0, 1, port, str(tmp_path / "one"))
    one = torch.load(tmp_path / "one" / "rank0.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # Skipped blocks keep no gradient on any rank (so AdamW skips them, as in one process).
    assert one["grads_none"] == ranks[0]["grads_none"] == ranks[1]["grads_none"]
    assert one["grads_none"][0] == [False, True, False, True]
    for r in ranks:
        for k, v in one["model"].items():
            assert torch.allclose(r["model"][k], v, rtol=1e-5, atol=1e-6), k
