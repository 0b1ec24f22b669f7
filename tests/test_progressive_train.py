"""AutoProg-One in the engine (compt.engine.progressive_train): real runs of a growing debug-L, exact resume
anywhere, the live MAC counter, a chain link grown from its teacher, and the config checks up front."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compt.config import ConfigError
from compt.engine.checkpoint import load_checkpoint, model_from_checkpoint
from compt.engine.progressive import Progression, ProgressiveConfig, Shape, stage_member
from compt.engine.progressive_cost import progressive_macs
from compt.engine.runlog import read_metrics
from compt.engine.train import TrainConfig, TrainingInterrupted, train_member
from compt.families import get_member
from compt.grow import grow
from compt.paradigms.clip.data import DataConfig

torch.set_num_threads(1)

DATA = DataConfig(kind="synthetic", num_samples=64)  # 4 steps per epoch at a global batch of 16
# debug-L: 2 blocks per tower, 16 px in 4 px patches; its growth space is depths 1, 2, 2, 2 and image
# sizes 8, 12, 12, 16. 40 steps: 4 stages of 10; a search is 6 steps (one per stage-0 candidate).
STEPS = 40
SEARCH = ProgressiveConfig(search_eval_batches=2)
MANUAL = ProgressiveConfig(schedule="manual")  # the linear ramp: a growth 1 -> 2 blocks at step 10
IMAGES = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def config(out: Path, **kw) -> TrainConfig:
    base = dict(member="debug-L", data=DATA, out_dir=str(out), steps=STEPS, global_batch_size=16,
                log_every_steps=1, save_every_steps=0, lr=1e-3, progressive=SEARCH)  # fmt: skip
    return TrainConfig(**(base | kw))


def _full_resolution(model, step) -> dict[str, float]:
    """What evaluation sees: the stage model at the member's own image size."""
    return {"embedding": float(model.encode_image(IMAGES).double().sum())}


def _records(out: Path, kind: str) -> list[dict]:
    return read_metrics(out / "metrics.jsonl", kind)


def _expected_macs(cfg: TrainConfig, final: Path, teacher: str | None = None) -> int:
    """The run's cost from its own schedule (final.pt holds the searches' outcomes)."""
    prog = Progression(cfg.progressive, get_member(cfg.member), cfg.steps, seed=cfg.seed,
                       teacher=teacher and get_member(teacher))  # fmt: skip
    prog.load_state_dict(load_checkpoint(final)["progressive"]["progression"])
    teacher_member = get_member(teacher) if teacher else None
    return progressive_macs(prog, batch_size=16, teacher=teacher_member).total_macs


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """An uninterrupted searched run, evaluated at full resolution every step."""
    cfg = config(tmp_path_factory.mktemp("searched"), deterministic=True, eval_every_steps=1)
    return cfg, train_member(cfg, evaluate=_full_resolution)


def test_a_searched_member_trains_its_stages_to_the_full_member(searched):
    cfg, result = searched
    out = Path(cfg.out_dir)
    final = load_checkpoint(result.final_checkpoint)
    assert final["model_cfg"] == get_member("debug-L").model_config()  # the member itself, not a stage
    model, _ = model_from_checkpoint(result.final_checkpoint)
    assert len(model.visual.transformer.resblocks) == 2
    start = _records(out, "start")[0]["progressive"]
    assert start["stage_bounds"] == [0, 10, 20, 30, 40] and start["image_sizes"] == [8, 12, 12, 16]
    chosen = [r for r in _records(out, "progressive") if r["event"] == "choose"]
    assert [r["stage"] for r in chosen] == [0, 1, 2] and chosen[0]["step"] == 6  # one step per candidate
    assert len(chosen[0]["losses"]) == 6 and all(loss > 0 for loss in chosen[0]["losses"].values())
    # The live counter is the schedule's cost: every stage at its depth and resolution, plus scoring.
    assert result.train_macs == _expected_macs(cfg, result.final_checkpoint)
    evals = _records(out, "eval")
    assert len(evals) == STEPS and all(abs(e["embedding"]) > 0 for e in evals)


def _interrupted(cfg: TrainConfig, stops: list[int]):
    """Train ``cfg``, stopped by SIGTERM before each step of ``stops`` and resumed each time."""
    for at in stops:

        def evaluate(model, step, at=at):
            if step == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return _full_resolution(model, step)

        with pytest.raises(TrainingInterrupted) as stopped:
            train_member(cfg, evaluate=evaluate)
        assert stopped.value.checkpoint.name == f"step_{at}.pt"
    return train_member(cfg, evaluate=_full_resolution)


def _same_run(a: Path, b: Path, ra, rb) -> None:
    wa, wb = load_checkpoint(ra.final_checkpoint)["model"], load_checkpoint(rb.final_checkpoint)["model"]
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "resumed weights differ from the uninterrupted run"
    assert (ra.steps, ra.samples_seen, ra.train_macs) == (rb.steps, rb.samples_seen, rb.train_macs)
    for kind, key in (("train", "loss"), ("eval", "embedding")):
        assert [r[key] for r in _records(a, kind)] == [r[key] for r in _records(b, kind)], kind
    strip = lambda rs: [{k: v for k, v in r.items() if k != "kind"} for r in rs]  # noqa: E731
    assert strip(_records(a, "progressive")) == strip(_records(b, "progressive"))


def test_resume_mid_search_and_where_a_search_is_scored_is_exact(searched, tmp_path):
    cfg, full = searched
    # Mid-search (stage 0's supernet), where it is scored (before step 6's choice), right after, and
    # mid-search again (stage 1's candidates at two resolutions).
    resumed_cfg = replace(cfg, out_dir=str(tmp_path / "resumed"))
    resumed = _interrupted(resumed_cfg, [3, 6, 7, 11])
    _same_run(Path(cfg.out_dir), tmp_path / "resumed", full, resumed)


def test_resume_across_a_growth_boundary_is_exact(tmp_path):
    kw = dict(progressive=MANUAL, deterministic=True, eval_every_steps=1)
    full = train_member(config(tmp_path / "full", **kw), evaluate=_full_resolution)
    assert [(r["event"], r["step"]) for r in _records(tmp_path / "full", "progressive")] == [("grow", 10)]
    resumed = _interrupted(config(tmp_path / "resumed", **kw), [5, 10, 11])  # a stage, the growth, after it
    _same_run(tmp_path / "full", tmp_path / "resumed", full, resumed)
    # Before the growth a step checkpoint holds the 1-block stage model, rebuilt from its own config.
    cfg = config(tmp_path / "early", progressive=MANUAL, steps=STEPS, save_every_steps=5, keep_last=0)
    with pytest.raises(TrainingInterrupted):
        train_member(replace(cfg, eval_every_steps=5), evaluate=lambda m, s: os.kill(os.getpid(), 15) or {})
    model, payload = model_from_checkpoint(tmp_path / "early" / "step_5.pt")
    assert len(model.visual.transformer.resblocks) == 1 and payload["progressive"]["ema"]


@pytest.mark.parametrize("optimizer_growth", ["carry", "reset"])
def test_adamw_moments_are_carried_across_the_growth_or_reset(tmp_path, optimizer_growth):
    progressive = replace(MANUAL, optimizer_growth=optimizer_growth, mogrow=False)
    result = train_member(config(tmp_path, steps=12, progressive=progressive, keep_moments=True))
    # 4 stages of 3 steps, the growth at step 3: every moment dates from step 0, or from the growth.
    steps = {m["step"] for m in load_checkpoint(result.final_checkpoint)["moments"].values()}
    assert steps == ({12} if optimizer_growth == "carry" else {9})


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    cfg = config(tmp_path_factory.mktemp("teacher"), member="debug-S", steps=4, progressive=None)
    return train_member(cfg).final_checkpoint


def test_a_progressive_link_grows_its_first_stage_from_the_teacher(tmp_path, teacher_ckpt):
    cfg = config(tmp_path, teacher=str(teacher_ckpt), progressive=MANUAL, steps=8, lr=1e-30,
                 save_every_steps=1, keep_last=0)  # fmt: skip
    result = train_member(cfg)
    # With a vanishing lr, stage 0's model after its first step is the one grown from the teacher.
    torch.manual_seed(cfg.seed)
    student = stage_member(get_member("debug-L"), Shape(1, 1, 16)).create()
    grow(load_checkpoint(teacher_ckpt), student, width=cfg.width, depth=cfg.depth, seed=cfg.seed)
    first = load_checkpoint(tmp_path / "step_1.pt")
    for key, value in student.state_dict().items():
        torch.testing.assert_close(first["model"][key], value, msg=key)
    # MoGrow's EMA started at the grown weights, not at the fresh ones.
    ema = {k.removeprefix("module."): v for k, v in first["progressive"]["ema"].items()}
    torch.testing.assert_close(ema["visual.conv1.weight"], student.visual.conv1.weight)
    # The teacher runs at each stage's resolution, and the counter says so.
    assert result.train_macs == _expected_macs(cfg, result.final_checkpoint, teacher="debug-S")
    assert _records(tmp_path, "train")[0]["loss_ifd"] > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(member="Swin-T"), "Swin-T.*Use a ViT member"),
        (dict(width="msg"), "cannot grow a link with width=msg"),
        (dict(steps=20), r"train.progressive: a search phase takes at least one step per candidate"),
        (dict(progressive={"shedule": "manual"}), "did you mean 'schedule'"),
    ],
)
def test_bad_progressive_configs_fail_at_load(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **kw)


def test_too_few_steps_from_epochs_fail_before_step_0(tmp_path):
    cfg = config(tmp_path, steps=None, epochs=2)  # 8 steps: no room for the searches
    with pytest.raises(ValueError, match="train.progressive: a search phase"):
        train_member(cfg)
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(ValueError, match="search_eval_batches=5: one epoch .* holds only 4 batches"):
        train_member(config(tmp_path, progressive=ProgressiveConfig()))


def test_resuming_with_another_schedule_is_refused(tmp_path):
    cfg = config(tmp_path, progressive=MANUAL, save_every_steps=4, eval_every_steps=4)
    with pytest.raises(TrainingInterrupted):
        train_member(cfg, evaluate=lambda m, s: os.kill(os.getpid(), signal.SIGTERM) or {})
    with pytest.raises(ValueError, match="different run: train.progressive"):
        train_member(replace(cfg, progressive=replace(MANUAL, mogrow=False)))
    with pytest.raises(ValueError, match="different run: train.progressive"):
        train_member(replace(cfg, progressive=None))


def test_cli_and_yaml_set_the_progressive_options(tmp_path):
    from compt.cli import build_parser
    from compt.cli.train import build_config

    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("member: debug-L\nprogressive: {num_stages: 2, mogrow: false}\n")
    args = ["train", "--config", str(yaml_file), "--progressive", "manual", "--set", "progressive.depth=0,1"]
    cfg = build_config(build_parser().parse_args(args))
    assert cfg.progressive == ProgressiveConfig(num_stages=2, schedule="manual", depth=(0, 1), mogrow=False)
    plain = build_config(
        build_parser().parse_args(["train", "--member", "debug-L", "--progressive", "search"])
    )
    assert plain.progressive == ProgressiveConfig()
    with pytest.raises(ConfigError, match="did you mean 'mogrow'"):
        build_config(
            build_parser().parse_args(["train", "--member", "debug-L", "--set", "progressive.mogrw=1"])
        )
