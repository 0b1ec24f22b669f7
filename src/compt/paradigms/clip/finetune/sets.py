"""Labelled fine-tuning sets: one generated from the embedded data, and any ImageFolder pair (issue 16).

Transfer is measured on a labelled train/test split (the CLIP paper's linear probes, clip_benchmark's
``linear_probe``). Offline there is no such set, so :func:`finetune_set` renders one from the
embedded generator (``data.synthetic``): a task whose label is one attribute of a scene that
the pretraining captions name but that the tiny members do not solve zero-shot (the reproduction's
per-task table: shape ~18% on 8 classes, count ~26% on 4, colour ~100%), so fine-tuning has room to
show. The scenes come from generator streams that neither the training set (stream 0) nor the
zero-shot eval sets (101-201) use, and train and test use different streams: the split is held out
and fixed by the seed.

:func:`write_finetune_set` writes it as two ImageFolders (``train/`` and ``test/``, the layout of
docs/data.md, with a ``classnames.yaml`` naming each class folder and its prompt templates);
:func:`load_splits` reads any such pair back and checks it (same class folders on both sides, at
least two classes, no empty training class) with errors that say what to fix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compt.engine.loader import DataError
from compt.paradigms.clip.data.evalsets import (
    EVAL_STREAMS,
    ZeroShotTask,
    export_imagefolder,
    imagefolder_task,
)
from compt.paradigms.clip.data.images import IMAGE_SUFFIXES
from compt.paradigms.clip.data.scene_captions import NUMBER
from compt.paradigms.clip.data.synthetic import (
    TRAIN_STREAM,
    SyntheticSpec,
    render_tensor,
    sample_scene,
    scene_rng,
)

__all__ = [
    "FinetuneTask",
    "register_finetune_task",
    "finetune_set",
    "write_finetune_set",
    "load_splits",
    "hold_out",
    "member_scenes",
]


@dataclass(frozen=True)
class FinetuneTask:
    """A generated classification task: its class names, templates, scene maker and generator streams."""

    name: str
    classnames: Callable[[SyntheticSpec], list[str]]
    make_scene: Callable[[np.random.Generator, SyntheticSpec, int], object]  # (rng, spec, label) -> Scene
    templates: tuple[str, ...]
    streams: tuple[int, int]  # (train, test) generator streams, distinct from every other set's


_TASKS: dict[str, FinetuneTask] = {}
# The streams of the pretraining scenes and of data.evalsets' held-out sets: never reused here.
_OTHER_STREAMS = frozenset({TRAIN_STREAM, *EVAL_STREAMS.values()})


def register_finetune_task(task: FinetuneTask) -> FinetuneTask:
    """Add a generated task to the registry (its streams must be unused by any other set)."""
    used = {s for t in _TASKS.values() for s in t.streams} | _OTHER_STREAMS
    if task.name in _TASKS or used & set(task.streams) or len(set(task.streams)) != 2:
        raise ValueError(f"fine-tuning task {task.name!r}: name or streams {task.streams} already used")
    _TASKS[task.name] = task
    return task


register_finetune_task(
    FinetuneTask(
        name="shape",
        classnames=lambda spec: list(spec.shapes),
        # One object of the class's shape; colour, size, texture and background vary freely.
        make_scene=lambda rng, spec, y: sample_scene(rng, spec, "single", objects=[(None, spec.shapes[y])]),
        templates=("a {}.", "a picture of a {}.", "an image showing a {}.", "a {} on a background."),
        streams=(401, 402),
    )
)
register_finetune_task(
    FinetuneTask(
        name="count",
        classnames=lambda spec: ["one shape"] + [f"{NUMBER[c]} shapes" for c in range(2, spec.max_count + 1)],
        make_scene=lambda rng, spec, y: sample_scene(rng, spec, "single" if y == 0 else "multi", count=y + 1),
        templates=("{}.", "a picture of {}.", "an image with {}.", "{} on a background."),
        streams=(403, 404),
    )
)


def _render_split(task: FinetuneTask, spec: SyntheticSpec, n: int, image_size: int, seed: int, stream: int):
    names = task.classnames(spec)
    # Balanced classes in a seeded order, as compt.paradigms.clip.data.evalsets does for its zero-shot tasks.
    labels = np.random.default_rng([seed, stream]).permutation(np.arange(n) % len(names))
    images = []
    for i, y in enumerate(labels):
        rng = scene_rng(seed, stream, i)
        images.append(render_tensor(task.make_scene(rng, spec, int(y)), image_size, rng, spec))
    return ZeroShotTask(
        f"{task.name}-{'train' if stream == task.streams[0] else 'test'}",
        names,
        list(task.templates),
        torch.stack(images),
        torch.as_tensor(labels, dtype=torch.long),
    )


def finetune_set(
    task: str = "shape",
    *,
    image_size: int = 32,
    num_train: int = 2000,
    num_test: int = 1000,
    seed: int = 0,
    spec: SyntheticSpec | None = None,
) -> tuple[ZeroShotTask, ZeroShotTask]:
    """The generated ``(train, test)`` split of ``task`` at ``image_size`` px (deterministic by seed).

    ``task`` is a registered name (``shape``: the object's shape, ``count``: how many copies);
    classes are balanced in each split; ``spec`` is the scene vocabulary (default: the full one).
    """
    if task not in _TASKS:
        raise DataError(f"unknown fine-tuning task {task!r}; choose from {sorted(_TASKS)}")
    if num_train < 1 or num_test < 1:
        raise DataError(f"fine-tuning set: num_train and num_test must be >= 1 (got {num_train}, {num_test})")
    if image_size < 8:
        raise DataError(f"fine-tuning set: image_size {image_size} is too small to draw shapes (need >= 8)")
    t, spec = _TASKS[task], spec or SyntheticSpec()
    train = _render_split(t, spec, num_train, image_size, seed, t.streams[0])
    test = _render_split(t, spec, num_test, image_size, seed, t.streams[1])
    return train, test


def write_finetune_set(out_dir: str | Path, task: str = "shape", **kwargs) -> tuple[Path, Path]:
    """Write :func:`finetune_set` as ``out_dir/train`` and ``out_dir/test`` ImageFolders; return both.

    Each folder holds ``<index>_<class>/<i>.png`` and a ``classnames.yaml`` (names and templates), the
    layout ``compt eval --imagefolder`` and :func:`load_splits` read. Keyword arguments go to
    :func:`finetune_set`.
    """
    out = Path(out_dir)
    train, test = finetune_set(task, **kwargs)
    return export_imagefolder(train, out / "train"), export_imagefolder(test, out / "test")


def _class_folders(root: Path, split: str) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{split} folder {root} does not exist (expected {root}/<class>/<image>.png)")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]


def load_splits(
    train_dir: str | Path, test_dir: str | Path, image_size: int
) -> tuple[ZeroShotTask, ZeroShotTask]:
    """Read a labelled ``(train, test)`` pair of ImageFolders at ``image_size`` px and check they agree.

    Images are resized and center-cropped to ``image_size`` as open_clip's eval transform does, so
    files of any size load; unreadable ones are skipped with a warning (``imagefolder_task``). Class
    names and templates come from each folder's ``classnames.{yaml,json,txt}`` (else the folder names).
    Raises :class:`~compt.engine.loader.DataError` when the two sides do not hold the same class
    folders, when there are fewer than two classes, or when a training class has no image.
    """
    train_root, test_root = Path(train_dir), Path(test_dir)
    train_classes = _class_folders(train_root, "train")
    test_classes = _class_folders(test_root, "test")
    if len(train_classes) < 2:
        raise DataError(
            f"{train_root}: {len(train_classes)} class folder(s) {train_classes}; a classifier needs at "
            "least two (one sub-folder per class)"
        )
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"train and test class folders differ: missing in {test_root}: {only_train}; missing in "
            f"{train_root}: {only_test}; both splits need the same class sub-folders (an empty one is fine "
            "in test)"
        )
    # Named here, before the zero-shot reader's own (and less specific) "fewer than two classes".
    no_files = [c for c in train_classes if not _image_files(train_root / c)]
    if no_files:
        raise DataError(
            f"{train_root}: class folder(s) {no_files} hold no readable image; add images or remove them"
        )
    train = imagefolder_task(train_root, image_size, name="train")
    test = imagefolder_task(test_root, image_size, name="test")
    counts = torch.bincount(train.labels, minlength=len(train_classes))
    empty = [c for c, n in zip(train_classes, counts.tolist(), strict=True) if n == 0]
    if empty:
        raise DataError(
            f"{train_root}: class folder(s) {empty} hold no readable image; add images or remove them"
        )
    if train.classnames != test.classnames:
        raise DataError(
            f"{train_root} and {test_root} name their classes differently ({train.classnames[:3]}... vs "
            f"{test.classnames[:3]}...); give both the same classnames file"
        )
    return train, test


def hold_out(task: ZeroShotTask, fraction: float, seed: int) -> tuple[ZeroShotTask, ZeroShotTask | None]:
    """``(rest, validation)``: a stratified, seeded ``fraction`` of ``task`` held out (``None`` for 0).

    Settings are chosen on the validation part and reported on the test split (issue 16).
    """
    if fraction == 0:
        return task, None
    from sklearn.model_selection import train_test_split

    n_val = max(len(task.classnames), round(fraction * len(task.labels)))
    if len(task.labels) - n_val < len(task.classnames):
        raise DataError(
            f"{task.name}: {len(task.labels)} images are too few to hold out {n_val} for validation and "
            "keep every class in the rest; add images or lower val_fraction"
        )
    keep, val = train_test_split(
        torch.arange(len(task.labels)).numpy(),
        test_size=n_val,
        stratify=task.labels.numpy(),
        random_state=seed,
    )

    def part(idx, name: str) -> ZeroShotTask:
        idx = torch.as_tensor(idx)
        return ZeroShotTask(name, task.classnames, task.templates, task.images[idx], task.labels[idx])

    return part(keep, task.name), part(val, f"{task.name}-val")


def member_scenes(path: str | Path) -> tuple[int, SyntheticSpec]:
    """``(image_size, scene vocabulary)`` a member was trained on, from its checkpoint or run folder.

    A set rendered with them (``compt finetune --make-set DIR --like CKPT``) names its classes in
    words the member's captions used. Raises :class:`DataError` for a member not trained on the
    embedded scenes and for an export folder (which keeps no training config).
    """
    from compt.config import from_dict
    from compt.engine.checkpoint import latest_checkpoint, load_checkpoint

    file: Path | None = Path(path)
    if file.is_dir():
        file = file / "final.pt" if (file / "final.pt").is_file() else latest_checkpoint(file)
    if file is None or not file.is_file():
        raise DataError(
            f"--like {path}: no checkpoint there; pass a member's final.pt or its run folder (an export "
            "folder keeps no training config)"
        )
    payload = load_checkpoint(file)
    data = (payload.get("config") or {}).get("data") or {}
    if data.get("kind") != "synthetic":
        raise DataError(
            f"--like {file}: the member was trained on data.kind={data.get('kind')!r}, not the embedded "
            "scenes; leave out --like (and give --image-size)"
        )
    spec = from_dict(SyntheticSpec, data.get("synthetic") or {}, where=f"{file}: config.data.synthetic")
    return int(payload["model_cfg"]["vision_cfg"].get("image_size", 224)), spec
