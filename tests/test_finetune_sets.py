"""compt.paradigms.clip.finetune.sets: the generated fine-tuning set and labelled ImageFolder pairs."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from compt.engine.loader import DataError
from compt.paradigms.clip.data import evalsets
from compt.paradigms.clip.data.synthetic import TRAIN_STREAM, SyntheticSpec
from compt.paradigms.clip.finetune import sets
from compt.paradigms.clip.finetune.sets import FinetuneTask, finetune_set, load_splits, write_finetune_set


def test_the_set_is_deterministic_by_seed_balanced_and_train_differs_from_test():
    train, test = finetune_set("shape", num_train=24, num_test=16, image_size=16)
    again, _ = finetune_set("shape", num_train=24, num_test=16, image_size=16)
    other, _ = finetune_set("shape", num_train=24, num_test=16, image_size=16, seed=1)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)
    assert train.classnames == list(SyntheticSpec().shapes) and train.images.shape == (24, 3, 16, 16)
    assert (
        torch.bincount(train.labels).tolist() == [3] * 8 and torch.bincount(test.labels).tolist() == [2] * 8
    )
    assert not any(torch.equal(a, b) for a in train.images for b in test.images)


def test_the_count_task_and_a_custom_vocabulary():
    spec = SyntheticSpec(shapes=("circle", "square"), max_count=3)
    train, _ = finetune_set("count", num_train=6, num_test=3, image_size=16, spec=spec)
    assert train.classnames == ["one shape", "two shapes", "three shapes"]


def test_its_generator_streams_are_held_out_from_training_and_eval_sets():
    assert sets._OTHER_STREAMS == {TRAIN_STREAM, *evalsets.EVAL_STREAMS.values()}
    used = [s for t in sets._TASKS.values() for s in t.streams]
    assert len(used) == len(set(used)) and not set(used) & sets._OTHER_STREAMS
    clash = FinetuneTask("clash", lambda spec: ["a", "b"], lambda rng, spec, y: None, ("{}",), (301, 399))
    with pytest.raises(ValueError, match="already used"):
        sets.register_finetune_task(clash)


def test_unknown_task_and_sizes_are_clear_errors():
    with pytest.raises(DataError, match="unknown fine-tuning task 'colour'.*count.*shape"):
        finetune_set("colour")
    with pytest.raises(DataError, match="num_train and num_test"):
        finetune_set("shape", num_train=0)


def test_written_set_loads_back_with_its_class_names(tmp_path):
    train_dir, test_dir = write_finetune_set(tmp_path, "shape", num_train=16, num_test=8, image_size=16)
    assert train_dir == tmp_path / "train" and sorted(p.name for p in test_dir.iterdir())[0] == "0_circle"
    meta = yaml.safe_load((train_dir / "classnames.yaml").read_text())
    assert meta["classnames"]["6_ring"] == "ring" and meta["templates"][0] == "a {}."
    train, test = load_splits(train_dir, test_dir, 16)
    made, _ = finetune_set("shape", num_train=16, num_test=8, image_size=16)
    assert train.classnames == made.classnames and train.templates == made.templates
    # Files are sorted by class folder; labels and pixels (8-bit PNG) come back with them.
    order = torch.argsort(made.labels * 1000 + torch.arange(16))
    assert torch.equal(train.labels, made.labels[order])
    assert (train.images - made.images[order]).abs().max() < 0.03  # one 8-bit step, normalized
    assert len(test.labels) == 8


def _folder(root, classes, per_class=2, size=16):
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_images_of_different_pixel_sizes_load_at_the_requested_size(tmp_path):
    train = _folder(tmp_path / "train", ["a", "b"], size=40)
    _folder(train, ["a"], per_class=1, size=12)  # overwrites a/0.png with a 12 px image
    test = _folder(tmp_path / "test", ["a", "b"], size=24)
    tr, te = load_splits(train, test, 16)
    assert tr.images.shape == (4, 3, 16, 16) and te.images.shape == (4, 3, 16, 16)


def test_missing_class_folders_are_a_clear_error(tmp_path):
    train = _folder(tmp_path / "train", ["cat", "dog", "owl"])
    test = _folder(tmp_path / "test", ["cat", "dog"])
    with pytest.raises(DataError, match=r"missing in .*test: \['owl'\]"):
        load_splits(train, test, 16)
    with pytest.raises(DataError, match="train folder .* does not exist"):
        load_splits(tmp_path / "nope", test, 16)


def test_one_class_is_a_clear_error(tmp_path):
    train = _folder(tmp_path / "train", ["cat"])
    test = _folder(tmp_path / "test", ["cat"])
    with pytest.raises(DataError, match=r"1 class folder\(s\) \['cat'\]; a classifier needs at least two"):
        load_splits(train, test, 16)


def test_a_training_class_without_images_is_a_clear_error(tmp_path):
    train = _folder(tmp_path / "train", ["cat", "dog"])
    test = _folder(tmp_path / "test", ["cat", "dog"])
    shutil.rmtree(train / "dog")
    (train / "dog").mkdir()
    (train / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) \['dog'\] hold no readable image"):
        load_splits(train, test, 16)
