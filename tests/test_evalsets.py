"""Held-out zero-shot tasks and retrieval set; ImageFolder tasks on real files (clip data.evalsets)."""

from __future__ import annotations

import collections
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from compt.engine.loader import sample_rng
from compt.paradigms.clip.data import DataConfig, DataError, build_dataset
from compt.paradigms.clip.data.evalsets import (
    DEFAULT_TEMPLATES,
    RetrievalSet,
    ZeroShotTask,
    _force_relation,
    check_imagefolder,
    embedded_eval_sets,
    export_imagefolder,
    imagefolder_task,
)
from compt.paradigms.clip.data.scene_captions import relation
from compt.paradigms.clip.data.synthetic import SyntheticSpec, sample_scene, scene_rng


@pytest.fixture(scope="module")
def small_sets():
    return embedded_eval_sets(
        32, num_images=120, num_retrieval=40, tasks=("shape", "colour", "count", "binding", "relation")
    )


def test_embedded_tasks_have_the_contract_fields(small_sets):
    tasks, retrieval = small_sets
    assert [t.name for t in tasks] == ["shape", "colour", "count", "binding", "relation"]
    for t in tasks:
        assert isinstance(t, ZeroShotTask)
        assert t.images.shape == (120, 3, 32, 32) and t.images.dtype == torch.float32
        assert t.labels.dtype == torch.long and len(t.labels) == 120
        assert len(set(t.classnames)) == len(t.classnames) and all("{}" in x for x in t.templates)
        counts = collections.Counter(t.labels.tolist())
        assert max(counts.values()) - min(counts.values()) <= 1 or len(t.classnames) > 120  # balanced
    (ret,) = retrieval
    assert isinstance(ret, RetrievalSet) and ret.images.shape == (40, 3, 32, 32)
    assert all(len(c) == 5 and len(set(c)) == 5 for c in ret.captions)


def test_binding_classes_come_in_swapped_pairs(small_sets):
    binding = small_sets[0][3]
    names = set(binding.classnames)
    assert len(names) == 72  # 6 shape pairs x 12 ordered colour pairs (4 shapes, 4 colours)
    for name in names:  # "red circle and a blue star" <-> "blue circle and a red star"
        (c1, s1), (c2, s2) = [part.split() for part in name.split(" and a ")]
        assert f"{c2} {s1} and a {c1} {s2}" in names


def test_relation_scenes_match_their_class():
    spec = SyntheticSpec()
    for i in range(30):
        for want in ("to the left of", "above"):
            scene = sample_scene(scene_rng(0, 7, i), spec, "pair", objects=[(None, "circle"), (None, "star")])
            a, b = _force_relation(scene, want).objects
            assert relation(a, b)[0] == want


def test_sets_are_deterministic_seeded_and_held_out(small_sets):
    again = embedded_eval_sets(
        32, num_images=120, num_retrieval=40, tasks=("shape", "colour", "count", "binding", "relation")
    )
    assert torch.equal(again[0][0].images, small_sets[0][0].images)
    other = embedded_eval_sets(32, seed=1, num_images=120, num_retrieval=0, tasks=("shape",))
    assert not torch.equal(other[0][0].images, small_sets[0][0].images) and other[1] == []
    # Held out: no eval image equals a training image of the same seed.
    train = build_dataset(DataConfig(num_samples=300), image_size=32, context_length=32)
    train_imgs = torch.stack([train.load(i, sample_rng(0, 0, i))[0] for i in range(300)])
    ret = small_sets[1][0].images
    dists = torch.cdist(ret.flatten(1), train_imgs.flatten(1))
    assert dists.min() > 1.0


def test_export_and_imagefolder_round_trip(tmp_path, small_sets):
    colour = small_sets[0][1]
    folder = export_imagefolder(colour, tmp_path / "colour")
    task = imagefolder_task(folder, 32)
    assert task.classnames == colour.classnames and task.templates == colour.templates
    assert task.name == "colour"
    # Files are listed per class folder; compare as sorted (label, image) multisets.
    assert sorted(task.labels.tolist()) == sorted(colour.labels.tolist())
    err = (
        task.images.mean(dim=(1, 2, 3)).sort().values - colour.images.mean(dim=(1, 2, 3)).sort().values
    ).abs()
    assert err.max() < 0.03  # uint8 quantization only


def _folder(tmp_path, classes=("golden_retriever", "tabby_cat"), per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (tmp_path / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (50, 40, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.jpg")
    return tmp_path


def test_imagefolder_names_templates_and_bad_files(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "tabby_cat" / "broken.jpg").write_bytes(b"garbage")
    (root / "tabby_cat" / "notes.txt").write_text("not an image")
    task = imagefolder_task(root, 24)
    assert task.classnames == ["golden retriever", "tabby cat"] and task.templates == list(DEFAULT_TEMPLATES)
    assert task.images.shape == (6, 3, 24, 24) and task.labels.tolist() == [0, 0, 0, 1, 1, 1]
    names = tmp_path / "names.yaml"
    names.write_text("classnames: [dog, cat]\ntemplates: ['a blurry photo of a {}.']\n")
    task = imagefolder_task(root, 24, classnames_file=names)
    assert task.classnames == ["dog", "cat"] and task.templates == ["a blurry photo of a {}."]
    txt = tmp_path / "names.txt"
    txt.write_text("dog\ncat\nbird\n")
    with pytest.raises(DataError, match="3 class names for 2 class folders"):
        imagefolder_task(root, 24, classnames_file=txt)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        imagefolder_task(tmp_path / "nope", 32)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        imagefolder_task(tmp_path / "flat", 32)
    with pytest.raises(DataError, match="templates need a"):
        ZeroShotTask(
            "t", ["a"], ["no placeholder"], torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long)
        )
    with pytest.raises(DataError, match="unknown embedded eval task"):
        embedded_eval_sets(32, tasks=("shapes",))


def test_one_class_is_refused_because_it_scores_100_whatever_the_model(tmp_path):
    root = _folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(
        DataError, match=r"one: 1 class folder\(s\) with image files \(cat;.*at least two classes"
    ):
        imagefolder_task(root, 24)
    (root / "dog").mkdir()  # a second class, but empty: still only one class with images
    with pytest.raises(DataError, match="1 class folder"):
        check_imagefolder(root)
    (root / "bird").mkdir()
    (root / "bird" / "0.jpg").write_bytes(b"not a jpeg")  # files, but none readable
    with pytest.raises(DataError, match=r"1 class folder\(s\) with readable images \(cat"):
        imagefolder_task(root, 24)


def test_an_empty_class_folder_is_named_in_a_warning_and_stays_a_candidate(tmp_path, caplog):
    root = _folder(tmp_path / "pets")
    (root / "hamster").mkdir()
    with caplog.at_level(logging.WARNING, logger="compt.paradigms.clip.data"):
        task = imagefolder_task(root, 24)
    assert task.classnames == ["golden retriever", "hamster", "tabby cat"]
    assert task.labels.tolist() == [0, 0, 0, 2, 2, 2]
    assert "1 class folder(s) without image files stay candidates" in caplog.text and "hamster" in caplog.text


def test_unreadable_eval_images_are_counted_by_reason(tmp_path, caplog):
    root = _folder(tmp_path / "pets")
    (root / "tabby_cat" / "broken.jpg").write_bytes(b"garbage")
    Image.fromarray(np.full((4, 4), 9.0, dtype=np.float32)).save(root / "tabby_cat" / "hdr.tif")
    with caplog.at_level(logging.WARNING, logger="compt.paradigms.clip.data"):
        task = imagefolder_task(root, 24)
    assert len(task.labels) == 6
    assert "skipped 2: corrupt_image=1, unsupported_image=1" in caplog.text


def test_a_class_names_file_that_is_not_utf8_names_itself(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "classnames.txt").write_bytes(b"golden retriever\ntabby c\xe4t\n")
    with pytest.raises(DataError, match=r"classnames.txt is not UTF-8 text.*save it as UTF-8"):
        imagefolder_task(root, 24)
