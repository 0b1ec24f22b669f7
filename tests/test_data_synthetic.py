"""The embedded set and the loader's determinism contract (clip data, data.synthetic)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from compt.config import ConfigError, from_dict
from compt.engine.loader import Skip, pin_batches, sample_rng
from compt.paradigms.clip.data import (
    DataConfig,
    DataError,
    SyntheticSpec,
    build_loader,
    list_datasets,
    register_dataset,
    tokenizer,
)
from compt.paradigms.clip.data.scene_captions import all_captions, describe
from compt.paradigms.clip.data.synthetic import SyntheticDataset, render, sample_scene, scene_rng

SMALL = DataConfig(num_samples=96, seed=3)


def _batches(cfg=SMALL, **kw):
    args = dict(image_size=32, context_length=32, global_batch_size=16)
    args.update(kw)
    return list(build_loader(cfg, **args))


def test_batches_have_the_contract_shapes_and_normalization():
    loader = build_loader(SMALL, image_size=32, context_length=32, global_batch_size=16)
    assert len(loader) == 96 // 16
    batches = list(loader)
    assert len(batches) == len(loader)
    images, texts = batches[0]
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
    assert texts.dtype == torch.int64 and texts.shape == (16, 4, 32)
    # open_clip normalization: pixels in [0, 1] map to roughly [-1.8, 2.2].
    assert -1.9 < images.min() < 0 < images.max() < 2.2
    sot = tokenizer(32)._base.sot_token_id
    assert (texts[:, :, 0] == sot).all()
    assert loader.skips == {}


def test_same_config_gives_identical_batches_and_epochs_differ():
    a, b = _batches(), _batches()
    for (ia, ta), (ib, tb) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    other_epoch = _batches(epoch=1)
    assert not torch.equal(a[0][0], other_epoch[0][0])  # a new order


def test_two_ranks_concatenate_to_the_one_rank_batch():
    one = _batches()
    r0, r1 = _batches(rank=0, world_size=2), _batches(rank=1, world_size=2)
    for (img, txt), (i0, t0), (i1, t1) in zip(one, r0, r1, strict=True):
        assert i0.shape[0] == 8
        assert torch.equal(torch.cat([i0, i1]), img)
        assert torch.equal(torch.cat([t0, t1]), txt)


def test_start_step_resumes_exactly():
    full = _batches()
    resumed = _batches(start_step=4)
    assert len(resumed) == len(full) - 4
    for (i, t), (ri, rt) in zip(full[4:], resumed, strict=True):
        assert torch.equal(i, ri) and torch.equal(t, rt)
    assert _batches(start_step=len(full)) == []
    with pytest.raises(DataError, match="start_step"):
        _batches(start_step=len(full) + 1)


def test_worker_processes_give_the_same_batches():
    cfg = DataConfig(num_samples=64, seed=3, workers=2)
    with_workers = _batches(cfg, start_step=1)
    in_process = _batches(DataConfig(num_samples=64, seed=3), start_step=1)
    assert len(with_workers) == len(in_process) == 3
    for (i, t), (wi, wt) in zip(in_process, with_workers, strict=True):
        assert torch.equal(i, wi) and torch.equal(t, wt)


def test_global_random_state_is_never_touched():
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    _batches()
    assert torch.equal(before[0], torch.get_rng_state())
    assert np.array_equal(before[1], np.random.get_state()[1])
    assert before[2] == random.getstate()


def test_caption_draws_depend_on_epoch_but_images_do_not():
    ds = SyntheticDataset(
        SyntheticSpec(), num_samples=10, seed=0, image_size=32, tokenize=tokenizer(32), num_captions=4
    )
    img0, tok0 = ds.load(5, sample_rng(0, 0, 5))
    img1, tok1 = ds.load(5, sample_rng(0, 1, 5))
    again, tok_again = ds.load(5, sample_rng(0, 0, 5))
    assert torch.equal(img0, img1) and torch.equal(img0, again) and torch.equal(tok0, tok_again)
    draws = {tuple(ds.load(5, sample_rng(0, e, 5))[1].flatten().tolist()) for e in range(12)}
    assert len(draws) > 4  # far more than the 4 subsets the official code's reseeding allows
    assert len({tuple(row.tolist()) for row in tok0}) == 4  # M distinct captions from the pool


def test_caption_pools_are_rich_partial_and_cover_the_scene():
    spec = SyntheticSpec()
    kinds = set()
    for i in range(60):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng, spec)
        kinds.add(scene.kind)
        pool = describe(scene, rng, spec.num_sub_captions)
        assert len(pool) == 1 + spec.num_sub_captions and len(set(pool)) == len(pool)
        primary = pool[0]
        for obj in scene.objects:  # the primary caption is complete
            assert obj.colour in primary and obj.shape in primary and obj.size in primary
        assert scene.background in primary
        colour = scene.objects[0].colour
        assert any(colour not in sub for sub in pool[1:])  # some sub-captions are partial
    assert kinds == {"single", "multi", "pair"}


def test_pair_scenes_bind_attributes_to_objects():
    spec = SyntheticSpec()
    rng = scene_rng(1, 99, 0)
    scene = sample_scene(rng, spec, "pair", objects=[("red", "circle"), ("blue", "square")])
    primary, subs = all_captions(scene)
    assert "red circle" in " ".join(subs) and "blue square" in " ".join(subs)
    assert "the circle is red and the square is blue." in subs


def test_debug_resolution_and_num_captions():
    cfg = DataConfig(num_samples=8, num_captions=2)
    (images, texts), *_ = _batches(cfg, image_size=16, context_length=16, global_batch_size=8)
    assert images.shape == (8, 3, 16, 16) and texts.shape == (8, 2, 16)


def test_grid_puts_every_object_inside_its_own_patch():
    # Issue 12: 32 px images, 8 px patches -> a 4 x 4 grid; every object inside one patch.
    spec = SyntheticSpec(sizes=("small", "medium"), object_scale=0.8, grid=4)
    cells = 0
    for i in range(200):
        scene = sample_scene(scene_rng(0, 0, i), spec)
        centres = [xy for o in scene.objects for xy in o.positions]
        for o in scene.objects:
            assert o.radius < 0.125  # half a cell
        for x, y in centres:
            assert (x * 4 - 0.5) == pytest.approx(round(x * 4 - 0.5)) and 0 < x < 1
            assert (y * 4 - 0.5) == pytest.approx(round(y * 4 - 0.5)) and 0 < y < 1
        assert len({(round(x, 6), round(y, 6)) for x, y in centres}) == len(centres)  # one object a cell
        cells += len(centres)
    assert cells > 250  # multi and pair scenes were among them
    # The image shows it: a lone object's pixels lie inside its cell (on a plain black background),
    # up to the anti-aliased tips of pointed shapes (triangle/star vertices reach 1.15 radii).
    dark = SyntheticSpec(
        sizes=("small", "medium"),
        object_scale=0.8,
        grid=4,
        backgrounds=("black",),
        patterns=("plain",),
        pixel_noise=0.0,
    )
    for i in range(40):
        rng = scene_rng(0, 0, i)
        scene = sample_scene(rng, dark, "single")
        ((x, y),) = scene.objects[0].positions
        cell = np.zeros((32, 32), bool)
        r0, c0 = int(y * 4) * 8, int(x * 4) * 8
        cell[max(0, r0 - 1) : r0 + 9, max(0, c0 - 1) : c0 + 9] = True
        bright = render(scene, 32, rng, dark).max(axis=2) > 0.3
        assert bright.any() and not (bright & ~cell).any()
    # Defaults keep the free placement, and a too-large object is a clear error.
    assert SyntheticSpec().grid == 0
    with pytest.raises(ValueError, match="fit a cell"):
        SyntheticSpec(sizes=("large",), grid=4)


def test_tokenizer_matches_open_clip():
    texts = [
        "a small red striped circle in the top left corner on a noisy black background.",
        "Hello   World!  It's 3.5 m.\tTabs\nand lines",
        "caf\u00e9 &amp; cr\u00e8me",  # non-ASCII and HTML entities take open_clip's own path
        "a " + "very " * 40 + "long caption",  # truncated, keeping the end token
        "",
    ]
    for i in range(30):
        scene = sample_scene(scene_rng(0, 0, i), SyntheticSpec())
        primary, subs = all_captions(scene)
        texts += [primary, *subs]
    ref = SimpleTokenizer()
    for length in (16, 32, 77):
        assert torch.equal(tokenizer(length)(texts), ref(texts, context_length=length))
    assert tokenizer(32) is tokenizer(32)


def test_a_user_registered_kind_plugs_in_and_bad_samples_are_dropped():
    class EveryThirdBad:
        def __len__(self):
            return 12

        def load(self, index, rng):
            if index % 3 == 0:
                return Skip("corrupt_image", f"item{index}")
            return torch.full((3, 8, 8), float(index)), torch.zeros(4, 8, dtype=torch.long)

    @register_dataset("every-third-bad")
    def _make(cfg, *, image_size, context_length):
        return EveryThirdBad()

    assert "every-third-bad" in list_datasets()
    cfg = DataConfig(kind="every-third-bad", max_skips=3)
    loader = build_loader(cfg, image_size=8, context_length=8, global_batch_size=6)
    with pytest.raises(DataError, match="more than data.max_skips=3"):
        list(loader)
    loader = build_loader(
        DataConfig(kind="every-third-bad"), image_size=8, context_length=8, global_batch_size=6
    )
    sizes = [len(images) for images, _ in loader]
    assert sum(sizes) == 8 and loader.skips == {"corrupt_image": 4}
    assert loader.summary() == "skipped 4: corrupt_image=4"


def test_config_errors_are_clear():
    with pytest.raises(DataError, match="did you mean 'synthetic'"):
        build_loader(DataConfig(kind="synthetc"), image_size=32, context_length=32, global_batch_size=8)
    with pytest.raises(ValueError, match="num_captions"):
        DataConfig(num_captions=0)
    with pytest.raises(ValueError, match="csv_separator"):
        DataConfig(csv_separator="ab")
    assert DataConfig(csv_separator="tab").csv_separator == "\t"
    assert DataConfig(csv_extra_caption_keys=["a", "b"]).csv_extra_caption_keys == ("a", "b")
    assert DataConfig(wds_caption_keys="a, b").wds_caption_keys == ("a", "b")
    with pytest.raises(ValueError, match="synthetic.colours"):
        SyntheticSpec(colours=("red", "mauve"))
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_loader(DataConfig(num_samples=4), image_size=32, context_length=32, global_batch_size=8)
    with pytest.raises(DataError, match="multiple of world_size"):
        build_loader(SMALL, image_size=32, context_length=32, global_batch_size=9, world_size=2)


def test_data_config_loads_from_a_nested_dict():
    cfg = from_dict(
        DataConfig, {"num_samples": 50, "synthetic": {"shapes": ["circle", "square"], "max_count": 3}}
    )
    assert cfg.synthetic.shapes == ("circle", "square") and cfg.synthetic.max_count == 3
    with pytest.raises(ConfigError, match="did you mean 'num_samples'"):
        from_dict(DataConfig, {"num_sample": 5})


def test_batches_are_pinned_only_when_workers_feed_a_cuda_device():
    assert pin_batches(torch.device("cuda", 0), workers=2)
    assert not pin_batches(torch.device("cuda", 0), workers=0)  # in-process: no extra copy
    assert not pin_batches(torch.device("cpu"), workers=2)
    assert not build_loader(SMALL, image_size=32, context_length=32, global_batch_size=16).pin_memory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_worker_batches_arrive_pinned():
    cfg = DataConfig(num_samples=64, seed=3, workers=1)
    pin = pin_batches(torch.device("cuda"), cfg.workers)
    loader = build_loader(cfg, image_size=32, context_length=32, global_batch_size=16, pin_memory=pin)
    pinned = next(iter(loader))
    assert pinned[0].is_pinned() and pinned[1].is_pinned()
    plain = next(iter(build_loader(cfg, image_size=32, context_length=32, global_batch_size=16)))
    assert torch.equal(pinned[0], plain[0]) and torch.equal(pinned[1], plain[1])  # same batch
