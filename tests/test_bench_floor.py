"""The generator oracle's val_loss (benchmarks/bench_floor.py): the floor docs/reproduce.md quotes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_floor import caption_likelihood, oracle_loss, val_floor  # noqa: E402
from reproduce_lib import BENCH_SPEC  # noqa: E402

from compt.paradigms.clip.data.scene_captions import all_captions  # noqa: E402
from compt.paradigms.clip.data.synthetic import sample_scene, scene_rng  # noqa: E402


def test_oracle_loss_by_hand():
    """Image 0 can read text 0 (p 1/2) or text 1 (1/4); image 1 only text 1 (1/4). Caption -> image:
    text 0 is image 0's for sure (0), text 1 is either (ln 2). Image -> caption, with p(c) the batch
    mean (1/4, 1/4): image 0 scores ln 2 and 0 (ln 1.5), image 1 has one possible text (0)."""
    p = torch.tensor([[0.5, 0.25], [0.0, 0.25]], dtype=torch.float64)
    assert oracle_loss(p) == pytest.approx((math.log(2) / 2 + math.log(1.5) / 2) / 2)


def test_a_scene_reads_one_of_its_own_captions_with_probability_one():
    for i in range(20):
        scene = sample_scene(scene_rng(0, 7, i), BENCH_SPEC)
        primary, subs = all_captions(scene)
        p = caption_likelihood([scene], [primary, *subs], BENCH_SPEC.num_sub_captions)
        assert float(p.sum()) == pytest.approx(1.0)
        assert float(p[0, 0]) == pytest.approx(1 / (1 + min(BENCH_SPEC.num_sub_captions, len(subs))))


def test_the_floor_lies_between_zero_and_chance_and_falls_with_the_batch():
    """Fewer images a batch, fewer that a caption is also true of: the floor falls with the batch."""
    small, large = (val_floor(0, BENCH_SPEC, num_images=128, batch_size=b)["best"] for b in (16, 128))
    assert 0 < small < large < math.log(128)
