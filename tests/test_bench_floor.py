"""The generator oracle's val_loss (benchmarks/bench_floor.py): the floor docs/reproduce.md quotes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_floor import (  # noqa: E402
    _colour_swaps,
    _placements,
    _size_assignments,
    blind_likelihood,
    caption_likelihood,
    oracle_loss,
    val_floor,
)
from reproduce_lib import BENCH_SPEC  # noqa: E402

from compt.paradigms.clip.data.scene_captions import _WHERE, all_captions  # noqa: E402
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


def _scene(kind: str):
    for i in range(200):
        scene = sample_scene(scene_rng(0, 7, i), BENCH_SPEC)
        if scene.kind == kind and (kind != "pair" or scene.objects[0].colour != scene.objects[1].colour):
            return scene
    raise AssertionError(f"no {kind} scene in 200 draws")


def test_a_binding_blind_oracle_cannot_tell_a_pair_from_its_colour_swap():
    pair = _scene("pair")
    (twin,) = [s for s in _colour_swaps(pair, BENCH_SPEC) if s is not pair]
    texts = [all_captions(pair)[0], all_captions(twin)[0]]  # each scene's own primary caption
    exact = caption_likelihood([pair], texts, BENCH_SPEC.num_sub_captions)
    blind = blind_likelihood([pair], texts, BENCH_SPEC, "binding")
    assert float(exact[0, 0]) > float(exact[0, 1])  # the oracle reads the right assignment ...
    assert float(blind[0, 0]) == pytest.approx(float(blind[0, 1]))  # ... the blind one cannot


def test_a_blind_oracle_sees_what_it_is_not_blind_to():
    """A one-object scene has no colour swap; its size-blind likelihood still sums to 1."""
    single = _scene("single")
    primary, subs = all_captions(single)
    texts = [primary, *subs]
    exact = caption_likelihood([single], texts, BENCH_SPEC.num_sub_captions)
    assert torch.equal(blind_likelihood([single], texts, BENCH_SPEC, "binding"), exact)
    variants = _size_assignments(single, BENCH_SPEC)
    every = sorted({t for s in variants for t in [all_captions(s)[0], *all_captions(s)[1]]})
    sized = blind_likelihood([single], every, BENCH_SPEC, "size")
    assert float(sized.sum()) == pytest.approx(1.0)
    assert len(variants) == len(BENCH_SPEC.sizes)


def test_a_position_blind_oracle_spreads_where_over_the_cells_of_each_region():
    """On the 4 x 4 grid the centre region holds 4 cells, an edge 2, a corner 1: the position-blind
    likelihood of "a <colour> <shape> <where>." is in those ratios whatever the scene's own place
    (variants that read the same captions are scored once and weighted by how many there are)."""
    single = _scene("single")
    o = single.objects[0]
    texts = [f"a {o.colour} {o.shape} {w}." for row in _WHERE for w in row]
    p = blind_likelihood([single], texts, BENCH_SPEC, "position")[0]
    cells = torch.tensor([1, 2, 1, 2, 4, 2, 1, 2, 1], dtype=p.dtype)
    assert torch.allclose(p / p.sum(), cells / cells.sum())
    assert len(_placements(single, BENCH_SPEC)) == BENCH_SPEC.grid**2
    copies = _scene("multi")  # no caption places copies of one object: nothing to be blind to
    primary, subs = all_captions(copies)
    exact = caption_likelihood([copies], [primary, *subs], BENCH_SPEC.num_sub_captions)
    assert torch.equal(blind_likelihood([copies], [primary, *subs], BENCH_SPEC, "position"), exact)
