"""The floor of the benchmark's ``val_loss``: what a critic that knows the data generator scores.

``val_loss`` (Eq. 2-3 on the embedded held-out set, docs/reproduce.md) cannot reach 0: a caption
such as "a red object" is true of many images of a batch, so even a perfect model spreads its
probability over them. Here every caption's likelihood under every image's scene is exact (the
caption pool of :func:`compt.paradigms.clip.data.scene_captions.describe`: the primary caption and a
uniform pick of 15 of the scene's other phrasings; each caption slot uniform over that pool), and the
loss of the same fixed batches and slots is computed with the critic the InfoNCE optimum is built
from (the density ratio, Oord et al. 2018): caption -> image rows score ``log p(c | i)``, image ->
caption rows ``log p(c | i) - log p(c)`` with ``p(c)`` the batch's mean likelihood, both times a
logit scale (the best of :data:`SCALES`, as a model learns its own). The oracle's loss is achievable
by a critic that knows each image's scene, so the true floor is at most this value, and a member's
distance to it is a lower bound on the room left.

A *blind* oracle (:data:`BLIND`) knows the scene up to one attribute: its likelihood is the mean over
the scenes it cannot tell apart (a two-object scene and its colour-swapped twin; every assignment of
sizes). Its loss minus the oracle's is what seeing that attribute is worth on the metric: the most a
member can gain by learning it. From the repository root::

    PYTHONPATH=src .venv/bin/python benchmarks/bench_floor.py     # -> benchmarks/results/bench/floor.json
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from compt.paradigms.clip.data.evalsets import EVAL_STREAMS, embedded_val_set
from compt.paradigms.clip.data.scene_captions import all_captions
from compt.paradigms.clip.data.synthetic import Scene, SyntheticSpec, sample_scene, scene_rng


def caption_likelihood(scenes: list[Scene], texts: list[str], num_sub_captions: int) -> torch.Tensor:
    """``[len(scenes), len(texts)]``: the probability that one caption slot of scene i reads text k."""
    p = torch.zeros(len(scenes), len(texts), dtype=torch.float64)
    for i, scene in enumerate(scenes):
        primary, subs = all_captions(scene)
        kept = min(num_sub_captions, len(subs))  # the pool keeps the primary and `kept` of the subs
        pool = 1 + kept
        chance = {s: kept / len(subs) / pool for s in subs}
        for k, text in enumerate(texts):
            p[i, k] = (text == primary) / pool + chance.get(text, 0.0)
    return p


def _colour_swaps(scene: Scene, spec: SyntheticSpec) -> list[Scene]:
    """A two-object scene and its twin with the colours swapped: what a bag of words cannot tell apart."""
    if scene.kind != "pair":
        return [scene]
    twin = copy.deepcopy(scene)
    a, b = twin.objects
    a.colour, b.colour = b.colour, a.colour
    return [scene, twin]


def _size_assignments(scene: Scene, spec: SyntheticSpec) -> list[Scene]:
    """The scene with every assignment of the spec's sizes to its objects."""
    out = []
    for sizes in itertools.product(spec.sizes, repeat=len(scene.objects)):
        variant = copy.deepcopy(scene)
        for obj, size in zip(variant.objects, sizes, strict=True):
            obj.size = size
        out.append(variant)
    return out


def _placements(scene: Scene, spec: SyntheticSpec) -> list[Scene]:
    """The scene with its objects in every pair of distinct cells of the grid (a 6 x 6 lattice for
    free placement): what a critic that cannot see where things are cannot tell apart. Copies of one
    object (``multi``) are never placed by a caption, so they keep theirs."""
    if scene.kind == "multi":
        return [scene]
    k = spec.grid or 6
    cells = [((i + 0.5) / k, (j + 0.5) / k) for j in range(k) for i in range(k)]
    out = []
    for where in itertools.permutations(cells, len(scene.objects)):
        variant = copy.deepcopy(scene)
        for obj, xy in zip(variant.objects, where, strict=True):
            obj.positions = [xy]
        out.append(variant)
    return out


# what a blind oracle cannot tell apart: the scenes whose caption likelihoods it averages
BLIND: dict[str, Callable[[Scene, SyntheticSpec], list[Scene]]] = {
    "binding": _colour_swaps,
    "size": _size_assignments,
    "position": _placements,
}


def blind_likelihood(scenes: list[Scene], texts: list[str], spec: SyntheticSpec, blind: str) -> torch.Tensor:
    """:func:`caption_likelihood` of a critic blind to ``blind``: per scene, the mean over its variants
    (``blind`` empty: the oracle's own)."""
    pool = spec.num_sub_captions
    if not blind:
        return caption_likelihood(scenes, texts, pool)
    rows = []
    for scene in scenes:
        # variants that read the same captions have the same likelihood: score each once, weighted
        seen: dict[tuple, list] = {}
        for variant in BLIND[blind](scene, spec):
            primary, subs = all_captions(variant)
            seen.setdefault((primary, *subs), [variant, 0])[1] += 1
        p = caption_likelihood([v for v, _ in seen.values()], texts, pool)
        weight = torch.tensor([n for _, n in seen.values()], dtype=p.dtype)
        rows.append(weight @ p / weight.sum())
    return torch.stack(rows)


SCALES = (1.0, 1.25, 1.5, 1.75, 2.0)  # logit scales of the oracle's critic (1.25 best on both splits)


def oracle_rows(p: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per image i of one slot of one batch (its i-th text is image i's), under the generator's critic
    ``p[i, k] = p(text k | image i)``: the mean of its rows in both directions of Eq. 2-3."""
    labels = torch.arange(p.shape[0])
    log_p = p.clamp_min(1e-300).log()
    # caption k against the images: posterior ∝ p(c|i); image i against the captions: the density ratio
    t2v = F.cross_entropy(scale * log_p.t(), labels, reduction="none")
    v2t = F.cross_entropy(scale * (log_p - p.mean(0, keepdim=True).log()), labels, reduction="none")
    return (t2v + v2t) / 2


def oracle_loss(p: torch.Tensor, scale: float = 1.0) -> float:
    """The symmetric contrastive loss of one slot of one batch under the generator's critic."""
    return float(oracle_rows(p, scale).mean())


def val_floor(
    seed: int, spec: SyntheticSpec, num_images: int = 2048, batch_size: int = 256, blind: str = ""
) -> dict[str, float]:
    """The oracle's loss at each of :data:`SCALES` on the embedded validation set of ``seed`` (the
    batches and caption draws of :func:`compt.paradigms.clip.data.evalsets.embedded_val_set`),
    averaged like ``val_loss``; ``best``: the lowest. ``blind``: a key of :data:`BLIND` (the oracle
    that cannot see that attribute), or empty."""
    # the captions, not the pixels, are what the oracle reads: any image size draws the same ones
    vset = embedded_val_set(32, seed, num_images=num_images, batch_size=batch_size, spec=spec)
    scenes = [sample_scene(scene_rng(seed, EVAL_STREAMS["val"], i), spec) for i in range(num_images)]
    likelihoods = []
    for start in range(0, num_images, batch_size):
        batch = range(start, min(start + batch_size, num_images))
        shown = [scenes[i] for i in batch]
        for slot in range(len(vset.captions[0])):
            texts = [vset.captions[i][slot] for i in batch]
            likelihoods.append(blind_likelihood(shown, texts, spec, blind))
    losses = {f"{s:g}": sum(oracle_loss(p, s) for p in likelihoods) / len(likelihoods) for s in SCALES}
    return losses | {"best": min(losses.values())}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from reproduce_lib import Protocol

    proto = Protocol()
    floors = {
        split: val_floor(seed, proto.spec, proto.val_images, proto.val_batch)
        for split, seed in (("val", 0), ("test", proto.eval_seed))
    }
    out = {"metric": "val_loss (nats)", "chance": math.log(proto.val_batch), "oracle": floors}
    for blind in BLIND:
        out[f"{blind}-blind oracle"] = {
            split: val_floor(seed, proto.spec, proto.val_images, proto.val_batch, blind)["best"]
            for split, seed in (("val", 0), ("test", proto.eval_seed))
        }
    path = Path(__file__).resolve().parent / "results" / "bench" / "floor.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
