"""The captions of the embedded set's scenes: one complete primary caption, 20 sub-caption phrasings.

App. A gives each image 16 texts: its raw caption plus 15 sub-captions split from MLLM long
captions, most of which describe only part of the image. The embedded set imitates that: the primary
caption names every attribute ("a large red striped circle in the top left corner on a noisy black
background."), and the sub-captions mention only some of them ("a red circle.", "something red.",
"the background is noisy black.") in varied phrasing. For two-object scenes several sub-captions
bind colour to shape ("the circle is red and the square is blue."), which the ``binding`` eval task
tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only for annotations: synthetic imports this module
    from compt.paradigms.clip.data.synthetic import Obj, Scene

__all__ = ["all_captions", "describe", "relation", "NUMBER"]

_WHERE = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)
NUMBER = ("zero", "one", "two", "three", "four", "five", "six")


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x", "sh", "ch")) else word + "s"


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _where(x: float, y: float) -> str:
    return _WHERE[min(2, int(y * 3))][min(2, int(x * 3))]


def relation(a: Obj, b: Obj) -> tuple[str, str]:
    """(a relative to b, b relative to a) from the dominant axis of their offset (y grows down)."""
    (ax, ay), (bx, by) = a.positions[0], b.positions[0]
    if abs(ax - bx) > abs(ay - by):
        return ("to the left of", "to the right of") if ax < bx else ("to the right of", "to the left of")
    return ("above", "below") if ay < by else ("below", "above")


def _np(o: Obj, *, size=True, colour=True, texture=True, n: int = 1) -> str:
    """A noun phrase for ``o`` with the chosen attributes, e.g. ``large red striped circle``."""
    words = [
        o.size if size else "",
        o.colour if colour else "",
        o.texture if texture and o.texture != "solid" else "",
    ]
    words.append(o.shape if n == 1 else _plural(o.shape))
    return " ".join(w for w in words if w)


def _bg(sc: Scene) -> str:
    return sc.background if sc.pattern == "plain" else f"{sc.pattern} {sc.background}"


def _single_captions(sc: Scene) -> tuple[str, list[str]]:
    o, bg = sc.objects[0], _bg(sc)
    full, where, tex = _np(o), _where(*o.positions[0]), o.texture
    primary = f"{_a(full)} {where} on {_a(bg)} background."
    return primary, [
        f"{_a(o.shape)}.",
        f"{_a(o.colour)} {o.shape}.",
        f"{_a(o.colour)} object.",
        f"something {o.colour}.",
        f"{_a(o.size)} {o.shape}.",
        f"{_a(tex)} {o.shape}.",
        f"{_a(o.shape)} {where}.",
        f"{_a(o.colour)} {o.shape} {where}.",
        f"{_a(o.shape)} on {_a(bg)} background.",
        f"there is {_a(full)} {where}.",
        f"the {o.shape} is {o.colour}.",
        f"the {o.shape} is {o.size}.",
        f"one shape, {_a(_np(o, size=False))}.",
        f"a picture of {_a(_np(o, size=False))}.",
        f"an image showing {_a(full)} {where} on {_a(bg)} background.",
        f"{where}, {_a(o.colour)} {o.shape}.",
        f"{_a(tex)} {o.colour} shape.",
        f"the background is {bg}.",
        f"{_a(o.shape)} that is {o.colour} and {o.size}.",
        f"{_a(o.colour)} shape on {_a(bg)} background.",
    ]


def _multi_captions(sc: Scene) -> tuple[str, list[str]]:
    o, bg, n = sc.objects[0], _bg(sc), sc.count
    num, shapes = NUMBER[n], _plural(o.shape)
    primary = f"{num} {_np(o, n=n)} on {_a(bg)} background."
    return primary, [
        f"{num} {shapes}.",
        f"{num} {o.colour} {shapes}.",
        f"{num} shapes.",
        f"several {o.colour} shapes.",
        f"some {shapes}.",
        f"{num} {o.size} {shapes}.",
        f"the {shapes} are {o.colour}.",
        f"there are {num} {_np(o, size=False, colour=False, n=n)}.",
        f"a group of {num} {o.colour} {shapes} on {_a(bg)} background.",
        f"{_a(o.colour)} {o.shape}.",
        f"{o.colour} {shapes} on {_a(bg)} background.",
        f"a picture of {num} {_np(o, n=n)}.",
        f"the background is {bg}.",
        f"{num} identical {o.colour} {shapes}.",
        f"the {shapes} are {o.size}.",
        f"an image with {num} {o.colour} objects.",
        f"{num} objects on {_a(bg)} background.",
        f"many copies of {_a(o.shape)}.",
        f"{o.texture} {shapes}.",
        f"{num} {o.size} {o.colour} shapes.",
    ]


def _pair_captions(sc: Scene) -> tuple[str, list[str]]:
    a, b = sc.objects
    bg = _bg(sc)
    rel_ab, rel_ba = relation(a, b)
    ca, cb = f"{a.colour} {a.shape}", f"{b.colour} {b.shape}"
    primary = f"{_a(_np(a))} {rel_ab} {_a(_np(b))} on {_a(bg)} background."
    return primary, [
        f"{_a(ca)} and {_a(cb)}.",
        f"{_a(cb)} and {_a(ca)}.",
        f"{_a(a.shape)} and {_a(b.shape)}.",
        f"{_a(ca)}.",
        f"{_a(cb)}.",
        f"{_a(a.colour)} object and {_a(b.colour)} object.",
        f"{_a(a.shape)} {rel_ab} {_a(b.shape)}.",
        f"{_a(cb)} {rel_ba} {_a(ca)}.",
        "two different shapes.",
        f"the {a.shape} is {a.colour} and the {b.shape} is {b.colour}.",
        f"the {a.shape} is {a.size} and the {b.shape} is {b.size}.",
        f"{_a(a.texture + ' ' + a.shape)} and {_a(b.texture + ' ' + b.shape)}.",
        f"two shapes on {_a(bg)} background.",
        f"{_a(_np(b))} {rel_ba} {_a(_np(a))}.",
        f"there is {_a(ca)} next to {_a(cb)}.",
        f"the background is {bg}.",
        f"{_a(ca)} {_where(*a.positions[0])}.",
        f"{_a(cb)} {_where(*b.positions[0])}.",
        f"a picture of {_a(_np(a))} and {_a(_np(b))}.",
        f"two objects: {_a(a.size)} one and {_a(b.size)} one.",
    ]


def all_captions(scene: Scene) -> tuple[str, list[str]]:
    """The complete primary caption of ``scene`` and every sub-caption phrasing (20) of its kind."""
    make = {"single": _single_captions, "multi": _multi_captions, "pair": _pair_captions}[scene.kind]
    primary, subs = make(scene)
    # Some phrasings coincide for some scenes (e.g. an omitted "solid"); keep each text once.
    return primary, [s for s in dict.fromkeys(subs) if s != primary]


def describe(scene: Scene, rng: np.random.Generator, num_sub_captions: int = 15) -> list[str]:
    """The caption pool of ``scene``: the complete primary caption, then ``num_sub_captions`` others."""
    primary, subs = all_captions(scene)
    picks = rng.choice(len(subs), size=min(num_sub_captions, len(subs)), replace=False)
    return [primary] + [subs[i] for i in sorted(picks)]
