"""Held-out evaluation sets: zero-shot classification tasks and image-text retrieval (§4, §5.2).

The paper scores members by zero-shot ImageNet-1K / VTAB+ accuracy and COCO retrieval. Offline,
the embedded set provides the same two kinds of benchmark, rendered from generator streams the
training set never uses:

* ``shape``, ``colour``, ``count``: one attribute per class ("a picture of a {}.");
* ``binding``: two objects; the classes are colour-shape pairs and their swaps ("red circle and a
  yellow triangle" vs "yellow circle and a red triangle"), so a bag of words gets at most half;
* ``relation`` (optional): "circle to the left of a ring" vs the reverse -- spatial binding;
* retrieval: scenes from the training distribution with held-out captions.

Real benchmarks use the same :class:`ZeroShotTask`: an ImageFolder (one sub-folder per class) plus
a class-names/templates file, read by :func:`imagefolder_task`. :func:`export_imagefolder` writes
any task in that layout, so the embedded tasks can be inspected or reused by other tools.
"""

from __future__ import annotations

import collections
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from compt.engine.loader import DataError, format_skips
from compt.paradigms.clip.data.images import IMAGE_SUFFIXES, MEAN, STD, ImageError, eval_transform, open_image
from compt.paradigms.clip.data.scene_captions import NUMBER, all_captions, relation
from compt.paradigms.clip.data.synthetic import Scene, SyntheticSpec, render_tensor, sample_scene, scene_rng

__all__ = [
    "ZeroShotTask",
    "RetrievalSet",
    "embedded_eval_sets",
    "imagefolder_task",
    "check_imagefolder",
    "ImageFolderLayout",
    "export_imagefolder",
    "DEFAULT_TASKS",
    "DEFAULT_TEMPLATES",
]

log = logging.getLogger("compt.paradigms.clip.data")
DEFAULT_TASKS = ("shape", "colour", "count", "binding")
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")


@dataclass(frozen=True)
class ZeroShotTask:
    """Images with labels into ``classnames``; prompts are ``template.format(classname)``."""

    name: str
    classnames: list[str]
    templates: list[str]
    images: torch.Tensor  # [N, 3, H, W] float32, open_clip-normalized
    labels: torch.Tensor  # [N] int64 in [0, len(classnames))

    def __post_init__(self) -> None:
        if not self.classnames or not self.templates:
            raise DataError(f"task {self.name!r}: needs at least one class name and one template")
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise DataError(f"task {self.name!r}: templates need a '{{}}' placeholder: {bad}")
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise DataError(
                f"task {self.name!r}: images {tuple(self.images.shape)} vs {len(self.labels)} labels"
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < len(
            self.classnames
        ):
            raise DataError(f"task {self.name!r}: labels outside 0..{len(self.classnames) - 1}")


@dataclass(frozen=True)
class RetrievalSet:
    """Images, each with its own list of matching captions (image i <-> captions[i])."""

    name: str
    images: torch.Tensor  # [N, 3, H, W]
    captions: list[list[str]]

    def __post_init__(self) -> None:
        if len(self.images) != len(self.captions) or any(not c for c in self.captions):
            raise DataError(f"retrieval set {self.name!r}: every image needs at least one caption")


# --- embedded tasks --------------------------------------------------------------------------------

# Generator streams of the held-out sets; training scenes use stream 0 (synthetic.TRAIN_STREAM).
_STREAMS = {"shape": 101, "colour": 102, "count": 103, "binding": 104, "relation": 105, "retrieval": 201}
_TaskFn = Callable[[SyntheticSpec, int, int, int], ZeroShotTask]
_TASKS: dict[str, _TaskFn] = {}


def _task(name: str):
    def deco(fn: _TaskFn) -> _TaskFn:
        _TASKS[name] = fn
        return fn

    return deco


def _render_all(scenes: list[tuple[Scene, np.random.Generator]], image_size: int, spec) -> torch.Tensor:
    return torch.stack([render_tensor(sc, image_size, rng, spec) for sc, rng in scenes])


def _balanced(n: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """``n`` labels, every class equally often (up to one), in a seeded random order."""
    return [int(v) for v in rng.permutation(np.arange(n) % num_classes)]


def _attribute_task(name: str, values: Sequence[str], make_scene, templates, spec, image_size, seed, n):
    labels = _balanced(n, len(values), np.random.default_rng([seed, _STREAMS[name]]))
    scenes = []
    for i, y in enumerate(labels):
        rng = scene_rng(seed, _STREAMS[name], i)
        scenes.append((make_scene(rng, values[y]), rng))
    return ZeroShotTask(
        name,
        list(values),
        list(templates),
        _render_all(scenes, image_size, spec),
        torch.tensor(labels, dtype=torch.long),
    )


@_task("shape")
def _shape(spec: SyntheticSpec, image_size: int, seed: int, n: int) -> ZeroShotTask:
    def make(rng, shape):
        return sample_scene(rng, spec, "single", objects=[(None, shape)])

    templates = ("a {}.", "a picture of a {}.", "an image showing a {}.", "a {} on a background.")
    return _attribute_task("shape", spec.shapes, make, templates, spec, image_size, seed, n)


@_task("colour")
def _colour(spec: SyntheticSpec, image_size: int, seed: int, n: int) -> ZeroShotTask:
    def make(rng, colour):
        return sample_scene(rng, spec, "single", objects=[(colour, None)])

    templates = ("a {} object.", "something {}.", "a {} shape.", "a picture of a {} shape.")
    return _attribute_task("colour", spec.colours, make, templates, spec, image_size, seed, n)


@_task("count")
def _count(spec: SyntheticSpec, image_size: int, seed: int, n: int) -> ZeroShotTask:
    names = ["one shape"] + [f"{NUMBER[c]} shapes" for c in range(2, spec.max_count + 1)]

    def make(rng, name):
        c = names.index(name) + 1
        return sample_scene(rng, spec, "single" if c == 1 else "multi", count=c)

    templates = ("{}.", "a picture of {}.", "an image with {}.", "{} on a background.")
    return _attribute_task("count", names, make, templates, spec, image_size, seed, n)


def _spread(values: Sequence[str], k: int) -> list[str]:
    """``k`` values spread evenly over ``values`` (distinct colours rather than neighbours)."""
    k = min(k, len(values))
    return [values[int(i)] for i in np.linspace(0, len(values) - 1, k).round()]


def _binding_classes(spec: SyntheticSpec, k: int) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    shapes, colours = _spread(spec.shapes, k), _spread(spec.colours, k)
    return [
        ((ca, s1), (cb, s2))
        for i, s1 in enumerate(shapes)
        for s2 in shapes[i + 1 :]
        for ca in colours
        for cb in colours
        if ca != cb
    ]


@_task("binding")
def _binding(spec: SyntheticSpec, image_size: int, seed: int, n: int, k: int = 4) -> ZeroShotTask:
    classes = _binding_classes(spec, k)
    names = [f"{ca} {s1} and a {cb} {s2}" for (ca, s1), (cb, s2) in classes]

    def make(rng, name):
        (a, b) = classes[names.index(name)]
        return sample_scene(rng, spec, "pair", objects=[a, b])

    templates = ("a {}.", "a picture of a {}.", "there is a {}.", "an image with a {}.")
    return _attribute_task("binding", names, make, templates, spec, image_size, seed, n)


def _force_relation(scene: Scene, want: str) -> Scene:
    """Move the pair so that object 0 is ``want`` ('to the left of' / 'above') object 1."""
    a, b = scene.objects
    vertical = relation(a, b)[0] in ("above", "below")
    if vertical != (want == "above"):
        for o in (a, b):  # transposing the layout turns left/right into above/below
            o.positions = [(y, x) for x, y in o.positions]
    if relation(a, b)[0] != want:
        a.positions, b.positions = b.positions, a.positions
    return scene


@_task("relation")
def _relation_task(spec: SyntheticSpec, image_size: int, seed: int, n: int, k: int = 4) -> ZeroShotTask:
    shapes = _spread(spec.shapes, k)
    rels = ("to the left of", "above")
    classes = [(s1, rel, s2) for s1 in shapes for s2 in shapes if s1 != s2 for rel in rels]
    names = [f"{s1} {rel} a {s2}" for s1, rel, s2 in classes]

    def make(rng, name):
        s1, rel, s2 = classes[names.index(name)]
        return _force_relation(sample_scene(rng, spec, "pair", objects=[(None, s1), (None, s2)]), rel)

    templates = ("a {}.", "a picture of a {}.", "there is a {}.", "an image with a {}.")
    return _attribute_task("relation", names, make, templates, spec, image_size, seed, n)


def _retrieval(spec: SyntheticSpec, image_size: int, seed: int, n: int, per_image: int = 5) -> RetrievalSet:
    scenes, captions = [], []
    for i in range(n):
        rng = scene_rng(seed, _STREAMS["retrieval"], i)
        scene = sample_scene(rng, spec)
        primary, subs = all_captions(scene)
        # The most complete phrasings (longest) besides the primary: each can identify the image.
        captions.append([primary] + sorted(subs, key=len, reverse=True)[: per_image - 1])
        scenes.append((scene, rng))
    return RetrievalSet("synthetic", _render_all(scenes, image_size, spec), captions)


def embedded_eval_sets(
    image_size: int,
    seed: int = 0,
    *,
    num_images: int = 500,
    num_retrieval: int = 500,
    tasks: Sequence[str] = DEFAULT_TASKS,
    spec: SyntheticSpec | None = None,
) -> tuple[list[ZeroShotTask], list[RetrievalSet]]:
    """The embedded zero-shot tasks and retrieval set at ``image_size`` (cached; do not mutate).

    ``num_images`` per task (classes balanced), ``num_retrieval`` retrieval images with 5 captions
    each; ``tasks`` from ``shape``, ``colour``, ``count``, ``binding``, ``relation``. The scenes
    come from generator streams the training set never uses, so they are held out for any seed.
    """
    zs, ret = _embedded(image_size, seed, num_images, num_retrieval, tuple(tasks), spec or SyntheticSpec())
    return list(zs), list(ret)


@functools.lru_cache(maxsize=8)
def _embedded(image_size, seed, num_images, num_retrieval, tasks, spec):
    unknown = [t for t in tasks if t not in _TASKS]
    if unknown:
        raise DataError(f"unknown embedded eval task(s) {unknown}; choose from {sorted(_TASKS)}")
    if num_images < 1 or num_retrieval < 0:
        raise DataError("num_images must be >= 1 and num_retrieval >= 0")
    zs = [_TASKS[t](spec, image_size, seed, num_images) for t in tasks]
    ret = [_retrieval(spec, image_size, seed, num_retrieval)] if num_retrieval else []
    return tuple(zs), tuple(ret)


# --- ImageFolder tasks -----------------------------------------------------------------------------


def _read_names_file(path: Path, folders: list[str]) -> tuple[list[str], list[str] | None]:
    """Class names (in sorted-folder order) and optional templates from a txt/json/yaml file."""
    if not path.is_file():
        raise DataError(f"class-names file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"class-names file {path} is not UTF-8 text ({e}); save it as UTF-8") from None
    if path.suffix == ".txt":
        data = {"classnames": [line.strip() for line in text.splitlines() if line.strip()]}
    else:
        try:
            data = yaml.safe_load(text)  # JSON is YAML too
        except yaml.YAMLError as e:
            raise DataError(f"{path}: not valid YAML/JSON ({e})") from None
        if isinstance(data, list):
            data = {"classnames": data}
        if not isinstance(data, dict) or "classnames" not in data:
            raise DataError(
                f"{path}: expected a list of names or a mapping with 'classnames' (and 'templates')"
            )
    names = data["classnames"]
    if isinstance(names, dict):  # folder -> name
        missing = [f for f in folders if f not in names]
        if missing:
            raise DataError(f"{path}: no class name for folder(s) {missing}")
        names = [str(names[f]) for f in folders]
    if not isinstance(names, list) or len(names) != len(folders):
        raise DataError(
            f"{path}: {len(names) if isinstance(names, list) else 'no'} class names for {len(folders)} "
            f"class folders ({', '.join(folders[:5])}...); give one per folder, in sorted folder order"
        )
    templates = data.get("templates")
    if templates is not None and (not isinstance(templates, list) or not templates):
        raise DataError(f"{path}: 'templates' must be a non-empty list of strings with '{{}}'")
    return [str(n) for n in names], templates


@dataclass(frozen=True)
class ImageFolderLayout:
    """What an ImageFolder holds, read without decoding an image (see :func:`check_imagefolder`)."""

    root: Path
    folders: list[str]  # class sub-folders, sorted: label i is folders[i]
    files: list[list[Path]]  # image files per class folder
    classnames: list[str]
    templates: list[str] | None  # from the class-names file, if it has them


def check_imagefolder(path: str | Path, classnames_file: str | Path | None = None) -> ImageFolderLayout:
    """Check an ImageFolder's layout and class names, cheaply (no image is decoded).

    Raises :class:`DataError` when it cannot make a meaningful zero-shot task: no folder, no class
    sub-folders, a names file that does not fit, or fewer than two classes with images (one class
    scores 100% whatever the model, issue 11 item 6). Class folders without images are kept as
    candidates (labels index the sorted folders; :func:`export_imagefolder` writes such folders for
    classes a small set did not draw) and named in a warning. A chain can call this before training.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"zero-shot folder {root} does not exist (expected one sub-folder per class)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>.jpg)")
    if classnames_file is None:
        found = [root / f"classnames{s}" for s in (".yaml", ".yml", ".json", ".txt")]
        classnames_file = next((f for f in found if f.is_file()), None)
    templates = None
    if classnames_file is not None:
        names, templates = _read_names_file(Path(classnames_file), folders)
    else:
        names = [f.replace("_", " ") for f in folders]
    files = [
        sorted(f for f in (root / d).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        for d in folders
    ]
    _check_classes(root, folders, [len(f) for f in files], "image files")
    return ImageFolderLayout(root, folders, files, names, templates)


def _check_classes(root: Path, folders: list[str], counts: list[int], what: str) -> None:
    """At least two classes with images (else an error); a warning naming the classes without."""
    empty = [f for f, n in zip(folders, counts, strict=True) if n == 0]
    having = [f for f, n in zip(folders, counts, strict=True) if n]
    if len(having) < 2:
        raise DataError(
            f"{root}: {len(having)} class folder(s) with {what} ({', '.join(having) or 'none'}; "
            f"suffixes {', '.join(sorted(IMAGE_SUFFIXES))}): zero-shot top-1 needs at least two classes, "
            "since one scores 100% whatever the model. Add class folders with images"
        )
    if empty:
        log.warning(
            "zero-shot folder %s: %d class folder(s) without %s stay candidates that can only be wrong: "
            "%s (add their images, or remove the folders if the class is not meant to be in the task)",
            root,
            len(empty),
            what,
            ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )


def imagefolder_task(
    path: str | Path,
    image_size: int,
    classnames_file: str | Path | None = None,
    *,
    name: str | None = None,
    templates: Sequence[str] | None = None,
) -> ZeroShotTask:
    """A zero-shot task from ``path/<class>/<image>`` (one sub-folder per class, sorted order).

    Class names come from ``classnames_file`` (or ``classnames.{yaml,json,txt}`` inside ``path``),
    else from the folder names with ``_`` as spaces; templates from that file, else ``templates``,
    else :data:`DEFAULT_TEMPLATES`. The layout is checked by :func:`check_imagefolder`; unreadable
    images are skipped, counted by reason in a warning.
    """
    layout = check_imagefolder(path, classnames_file)
    root = layout.root
    images, labels, skipped = [], [], collections.Counter()
    for label, files in enumerate(layout.files):
        for file in files:
            try:
                images.append(eval_transform(open_image(file, draft_size=image_size), image_size))
                labels.append(label)
            except ImageError as e:
                skipped[e.reason] += 1
                log.warning("zero-shot task %s: skipping %s (%s)", root.name, file, e)
    if skipped:
        log.warning("zero-shot task %s: %s", root.name, format_skips(dict(skipped)))
    counts = collections.Counter(labels)
    _check_classes(root, layout.folders, [counts[i] for i in range(len(layout.folders))], "readable images")
    return ZeroShotTask(
        name or root.name,
        layout.classnames,
        list(layout.templates or templates or DEFAULT_TEMPLATES),
        torch.stack(images),
        torch.tensor(labels, dtype=torch.long),
    )


def export_imagefolder(task: ZeroShotTask, folder: str | Path) -> Path:
    """Write ``task`` as ``folder/<class index>_<name>/<i>.png`` + ``classnames.yaml``; returns folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    width = len(str(len(task.classnames) - 1))
    dirs = [f"{i:0{width}d}_{n.replace(' ', '_')}" for i, n in enumerate(task.classnames)]
    pixels = (task.images * STD + MEAN).clamp(0, 1).mul(255).round().to(torch.uint8)
    for i, (img, y) in enumerate(zip(pixels, task.labels.tolist(), strict=True)):
        (folder / dirs[y]).mkdir(exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / dirs[y] / f"{i:05d}.png")
    for d in dirs:  # classes without images still need their folder (labels index sorted folders)
        (folder / d).mkdir(exist_ok=True)
    meta = {"classnames": dict(zip(dirs, task.classnames, strict=True)), "templates": list(task.templates)}
    (folder / "classnames.yaml").write_text(yaml.safe_dump(meta, sort_keys=False), encoding="utf-8")
    return folder
