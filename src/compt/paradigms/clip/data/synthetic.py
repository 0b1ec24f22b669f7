"""The embedded image-caption set: compositional scenes rendered from a seed, 16 captions per image.

Stands in for CC3M + DreamLIP long captions (§4, App. A) on a machine with no data: every image is a
scene of one to four shapes (shape, colour, size, texture, position, count, background) drawn from a
generator seeded by ``(seed, stream, index)``, so the set is reproducible, needs no file, and can be
as large as wanted (images are rendered on the fly). Each image carries a complete primary caption
plus ``num_sub_captions`` (default 15, as App. A) sub-captions in varied phrasing, most of which
mention only some attributes, so the multi-caption sampling of §3.2 is exercised for real (the
phrasing lives in ``compt.paradigms.clip.data.scene_captions``).

Difficulty is deliberate: colours are jittered and lit unevenly, objects are small at 32 px,
backgrounds are noisy or shaded, and 40% of scenes hold two different objects whose attributes must
be bound ("a red circle and a blue square" vs the swap) -- a capacity gradient across the tiny family
rather than a task every member saturates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from compt.paradigms.clip.data.images import MEAN, STD
from compt.paradigms.clip.data.scene_captions import all_captions, describe

__all__ = [
    "SyntheticSpec",
    "Obj",
    "Scene",
    "SyntheticDataset",
    "sample_scene",
    "render",
    "render_tensor",
    "describe",
    "all_captions",
    "scene_rng",
]

# Base RGB of every colour name the renderer knows (a spec picks a subset).
COLOUR_RGB = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.96, 0.52, 0.08),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.16, 0.68, 0.20),
    "cyan": (0.10, 0.78, 0.84),
    "blue": (0.14, 0.26, 0.92),
    "purple": (0.55, 0.20, 0.78),
    "pink": (0.97, 0.50, 0.72),
    "brown": (0.50, 0.30, 0.12),
}
BACKGROUND_TONE = {"black": 0.07, "gray": 0.48, "white": 0.93}
SIZE_RADIUS = {"small": 0.1, "medium": 0.14, "large": 0.185}  # fraction of the image side
KNOWN_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
KNOWN_TEXTURES = ("solid", "striped", "checkered")
KNOWN_PATTERNS = ("plain", "noisy", "shaded")


def _check_subset(name: str, values: tuple[str, ...], known) -> None:
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise ValueError(f"synthetic.{name}: unknown {unknown or 'empty list'}; choose from {sorted(known)}")
    if len(set(values)) != len(values):
        raise ValueError(f"synthetic.{name}: duplicate entries in {list(values)}")


@dataclass(frozen=True)
class SyntheticSpec:
    """The vocabulary and mix of the embedded set (each list a subset of what the renderer knows)."""

    shapes: tuple[str, ...] = KNOWN_SHAPES  # object shapes
    colours: tuple[str, ...] = tuple(COLOUR_RGB)  # object colours
    sizes: tuple[str, ...] = tuple(SIZE_RADIUS)  # object sizes (radius 10/14/18.5% of the side)
    textures: tuple[str, ...] = KNOWN_TEXTURES  # object fills (medium and large objects only)
    backgrounds: tuple[str, ...] = tuple(BACKGROUND_TONE)  # background tones
    patterns: tuple[str, ...] = KNOWN_PATTERNS  # background patterns
    max_count: int = 4  # most copies of one object in a scene
    p_pair: float = 0.4  # share of scenes with two different objects (the binding cases)
    p_multi: float = 0.25  # share of scenes with 2..max_count copies of one object
    num_sub_captions: int = 15  # sub-captions per image besides the primary (App. A: 15)
    colour_jitter: float = 0.07  # std of per-object RGB jitter, in [0, 1] units
    pixel_noise: float = 0.025  # std of per-pixel noise over the whole image
    # Object size vs patch size (issue 12): `grid` k > 0 centres every object in its own cell of a
    # k x k grid -- k = image_size / patch_size puts each object inside one ViT patch, where its
    # shape is learned fast (docs/data.md) -- and `object_scale` multiplies every size's radius.
    grid: int = 0  # 0: free placement anywhere in the image
    object_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_subset("shapes", self.shapes, KNOWN_SHAPES)
        _check_subset("colours", self.colours, COLOUR_RGB)
        _check_subset("sizes", self.sizes, SIZE_RADIUS)
        _check_subset("textures", self.textures, KNOWN_TEXTURES)
        _check_subset("backgrounds", self.backgrounds, BACKGROUND_TONE)
        _check_subset("patterns", self.patterns, KNOWN_PATTERNS)
        if len(self.shapes) < 2 or len(self.colours) < 2:
            raise ValueError("synthetic: need at least 2 shapes and 2 colours (pair scenes use two)")
        if not 2 <= self.max_count <= 6:
            raise ValueError(f"synthetic.max_count must be in 2..6, got {self.max_count}")
        if not (0 <= self.p_pair and 0 <= self.p_multi and self.p_pair + self.p_multi <= 1):
            raise ValueError("synthetic.p_pair and p_multi must be >= 0 and sum to at most 1")
        if not 8 <= self.num_sub_captions <= 20:
            raise ValueError(f"synthetic.num_sub_captions must be in 8..20, got {self.num_sub_captions}")
        if self.colour_jitter < 0 or self.pixel_noise < 0:
            raise ValueError("synthetic.colour_jitter and pixel_noise must be >= 0")
        if not 0 < self.object_scale <= 2:
            raise ValueError(f"synthetic.object_scale must be in (0, 2], got {self.object_scale}")
        if self.grid:
            largest = 1.1 * self.object_scale * max(SIZE_RADIUS[s] for s in self.sizes)  # with jitter
            if not 2 <= self.grid <= 8 or self.grid**2 < self.max_count or largest > 0.5 / self.grid:
                raise ValueError(
                    f"synthetic.grid={self.grid}: needs 2..8 cells a side, at least max_count="
                    f"{self.max_count} cells, and objects that fit a cell (largest radius {largest:.3f} "
                    f"> {0.5 / self.grid:.3f}); lower object_scale or drop the large sizes"
                )


@dataclass
class Obj:
    """One kind of object in a scene (``count`` copies at ``positions``); attributes are names."""

    shape: str
    colour: str
    size: str
    texture: str
    positions: list[tuple[float, float]] = field(default_factory=list)
    radius: float = 0.1
    angle: float = 0.0
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Scene:
    """``kind`` is ``single`` (one object), ``multi`` (copies of one object) or ``pair``."""

    kind: str
    objects: list[Obj]
    background: str
    pattern: str

    @property
    def count(self) -> int:
        return sum(len(o.positions) for o in self.objects)


# --- scene sampling ------------------------------------------------------------------------------


def _place(rng: np.random.Generator, radius: float, placed: list[tuple[float, float, float]], grid: int = 0):
    """A centre for a disc of ``radius`` not overlapping ``placed`` (x, y, r) discs, or None.

    With ``grid`` k, the centre of a free cell of the k x k grid: the disc fits inside it (the tips of
    a triangle or star, at 1.15 radii, may reach a pixel beyond).
    """
    if grid:
        taken = {(round(px * grid - 0.5), round(py * grid - 0.5)) for px, py, _ in placed}
        free = [(i, j) for j in range(grid) for i in range(grid) if (i, j) not in taken]
        if not free:
            return None
        i, j = free[int(rng.integers(len(free)))]
        return (i + 0.5) / grid, (j + 0.5) / grid
    lo, hi = radius + 0.02, 1.0 - radius - 0.02
    for _ in range(30):
        x, y = rng.uniform(lo, hi, size=2)
        if all((x - px) ** 2 + (y - py) ** 2 > (radius + pr + 0.03) ** 2 for px, py, pr in placed):
            return float(x), float(y)
    return None


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _new_obj(rng: np.random.Generator, spec: SyntheticSpec, shape=None, colour=None) -> Obj:
    size = _pick(rng, spec.sizes)
    texture = _pick(rng, spec.textures) if size != "small" else "solid"  # invisible when small
    colour = colour or _pick(rng, spec.colours)
    base = np.array(COLOUR_RGB[colour])
    rgb = np.clip(base * rng.uniform(0.8, 1.08) + rng.normal(0, spec.colour_jitter, 3), 0, 1)
    return Obj(
        shape=shape or _pick(rng, spec.shapes),
        colour=colour,
        size=size,
        texture=texture,
        radius=SIZE_RADIUS[size] * spec.object_scale * rng.uniform(0.9, 1.1),
        angle=float(rng.uniform(-0.35, 0.35)),
        rgb=tuple(float(v) for v in rgb),
    )


def sample_scene(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    kind: str | None = None,
    count: int | None = None,
    objects: list[tuple[str, str]] | None = None,
) -> Scene:
    """Draw a scene; ``kind``/``count``/``objects`` ((colour, shape) pairs) pin it for eval tasks."""
    if kind is None:
        u = rng.uniform()
        kind = "pair" if u < spec.p_pair else "multi" if u < spec.p_pair + spec.p_multi else "single"
    fixed = [(shape, colour) for colour, shape in (objects or [])]
    if kind == "pair":
        first = _new_obj(rng, spec, *fixed[0]) if fixed else _new_obj(rng, spec)
        if fixed:
            second = _new_obj(rng, spec, *fixed[1])
        else:  # two different shapes, so "the circle is red and the square is blue" names each one
            second = _new_obj(rng, spec)
            while second.shape == first.shape:
                second.shape = _pick(rng, spec.shapes)
        objs = [first, second]
    else:
        n = count or (1 if kind == "single" else int(rng.integers(2, spec.max_count + 1)))
        objs = [_new_obj(rng, spec, *fixed[0]) if fixed else _new_obj(rng, spec)]
        objs[0].positions = [None] * n  # type: ignore[list-item]
    _layout(rng, kind, objs, spec.grid)
    bg = _pick(rng, spec.backgrounds)
    pattern = _pick(rng, spec.patterns)
    return Scene(kind=kind, objects=objs, background=bg, pattern=pattern)


def _layout(rng: np.random.Generator, kind: str, objs: list[Obj], grid: int = 0) -> None:
    """Place every copy without overlap; a pair is placed so its relation (left/above) is clear."""
    for _attempt in range(20 if not grid else 100):
        placed: list[tuple[float, float, float]] = []
        ok = True
        for obj in objs:
            n = 1 if kind == "pair" else len(obj.positions)
            obj.positions = []
            for _ in range(n):
                xy = _place(rng, obj.radius, placed, grid)
                if xy is None:
                    ok = False
                    break
                obj.positions.append(xy)
                placed.append((*xy, obj.radius))
        if ok and kind == "pair":
            (ax, ay), (bx, by) = objs[0].positions[0], objs[1].positions[0]
            dx, dy = abs(ax - bx), abs(ay - by)
            ok = max(dx, dy) > 1.4 * min(dx, dy)  # one axis clearly dominates
        if ok:
            return
        if not grid:  # crowded: shrink and retry (grid cells never crowd; only the relation failed)
            for obj in objs:
                obj.radius *= 0.9
    raise RuntimeError("could not lay out a synthetic scene")  # unreachable for max_count <= 6


# --- rendering -----------------------------------------------------------------------------------


def _polygon(shape: str) -> np.ndarray | None:
    """Unit-radius vertices of a polygonal shape (None for the round ones)."""
    k = np.arange
    if shape == "square":
        a = np.pi / 4 + k(4) * np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "diamond":
        return np.array([[0, -1.1], [0.7, 0], [0, 1.1], [-0.7, 0]])
    if shape == "triangle":
        a = -np.pi / 2 + k(3) * 2 * np.pi / 3
        return 1.15 * np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "hexagon":
        a = k(6) * np.pi / 3
        return np.stack([np.cos(a), np.sin(a)], 1)
    if shape == "star":
        a = -np.pi / 2 + k(10) * np.pi / 5
        r = np.where(k(10) % 2 == 0, 1.15, 0.48)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if shape == "cross":
        w = 0.34
        return np.array(
            [
                [-w, -1],
                [w, -1],
                [w, -w],
                [1, -w],
                [1, w],
                [w, w],
                [w, 1],
                [-w, 1],
                [-w, w],
                [-1, w],
                [-1, -w],
                [-w, -w],
            ]
        )
    return None


_POLYGONS = {s: _polygon(s) for s in KNOWN_SHAPES}


def _mask(obj: Obj, size: int, ss: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] of all copies of ``obj`` (drawn at ``ss``x, box-reduced)."""
    big = size * ss
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    r = obj.radius * big
    poly = _POLYGONS[obj.shape]
    if poly is not None:
        c, s = math.cos(obj.angle), math.sin(obj.angle)
        rot = poly @ np.array([[c, s], [-s, c]])
    for x, y in obj.positions:
        cx, cy = x * big, y * big
        if poly is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
            if obj.shape == "ring":
                ri = 0.55 * r
                draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
        else:
            draw.polygon([(cx + px * r, cy + py * r) for px, py in rot], fill=255)
    return np.asarray(img.reduce(ss), dtype=np.float32) * (1.0 / 255.0)


def _fill(obj: Obj, size: int, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The colour field of ``obj``: solid, or its colour alternating with a darker shade."""
    rgb = np.array(obj.rgb, dtype=np.float32)
    if obj.texture == "solid":
        return rgb
    yy, xx = grid
    period = max(2.5, obj.radius * size * 0.7)  # pixels; >= 2.5 so stripes survive at 32 px
    if obj.texture == "striped":
        on = ((xx + yy) / period) % 1.0 < 0.5
    else:  # checkered
        on = ((np.floor(xx / period) + np.floor(yy / period)) % 2) == 0
    return np.where(on[..., None], rgb, rgb * 0.35)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rows/cols and the same centred in [-0.5, 0.5) (read-only, shared between calls)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grids = (yy, xx, yy / size - 0.5, xx / size - 0.5)
    for g in grids:
        g.flags.writeable = False
    return grids


def render(scene: Scene, image_size: int, rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """The scene as float32 RGB [H, W, 3] in [0, 1] (noise drawn from ``rng``)."""
    s = image_size
    ss = max(2, math.ceil(64 / s))  # supersampling factor for smooth edges
    yy, xx, cy, cx = _grid(s)
    tone = BACKGROUND_TONE[scene.background] + rng.uniform(-0.04, 0.04)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = tone + 0.02 * rng.standard_normal(3, dtype=np.float32)  # slight tint
    if scene.pattern == "noisy":
        img += 0.09 * rng.standard_normal((s, s, 1), dtype=np.float32)
    elif scene.pattern == "shaded":
        a = rng.uniform(0, 2 * np.pi)
        img += (0.35 * (np.float32(np.cos(a)) * cx + np.float32(np.sin(a)) * cy))[..., None]
    for obj in scene.objects:
        m = _mask(obj, s, ss)[..., None]
        img += (_fill(obj, s, (yy, xx)) - img) * m  # alpha blend by coverage
    lx, ly = rng.uniform(-0.15, 0.15, 2).astype(np.float32)
    img *= (1.0 + lx * cx + ly * cy)[..., None]  # uneven lighting
    img += spec.pixel_noise * rng.standard_normal((s, s, 3), dtype=np.float32)
    return np.clip(img, 0.0, 1.0, out=img)


_MEAN_HWC = MEAN.view(1, 1, 3).numpy()
_STD_HWC = STD.view(1, 1, 3).numpy()


def render_tensor(scene: Scene, image_size: int, rng: np.random.Generator, spec: SyntheticSpec):
    """The scene rendered and normalized as open_clip expects: float32 tensor [3, H, W]."""
    import torch

    arr = (render(scene, image_size, rng, spec) - _MEAN_HWC) / _STD_HWC
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))


# --- the training set ----------------------------------------------------------------------------

TRAIN_STREAM = 0  # the rng stream of training scenes; eval sets use other streams (held out)


def scene_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator that fixes scene ``index`` of ``stream`` (its layout, pixels and caption pool)."""
    return np.random.default_rng([seed & 0xFFFFFFFF, stream, index & 0xFFFFFFFF, index >> 32])


class SyntheticDataset:
    """``num_samples`` rendered scenes; each load draws M of the image's 16 captions with ``rng``.

    The image and its caption pool are fixed by ``(seed, index)`` (a finite dataset, like a real
    one); only the M-caption draw changes from epoch to epoch, as in §3.2.
    """

    def __init__(
        self,
        spec: SyntheticSpec,
        *,
        num_samples: int,
        seed: int,
        image_size: int,
        tokenize,
        num_captions: int,
    ):
        if num_samples < 1:
            raise ValueError("data.num_samples must be >= 1 for the synthetic set")
        if image_size < 8:
            raise ValueError(f"image_size {image_size} is too small to draw shapes (need >= 8)")
        self.spec, self.num_samples, self.seed = spec, num_samples, seed
        self.image_size, self.tokenize, self.num_captions = image_size, tokenize, num_captions

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[Scene, np.random.Generator]:
        rng = scene_rng(self.seed, TRAIN_STREAM, index)
        return sample_scene(rng, self.spec), rng

    def captions(self, index: int) -> list[str]:
        """The caption pool of image ``index`` (primary first)."""
        scene, rng = self.scene(index)
        render(scene, self.image_size, rng, self.spec)  # advance rng exactly as load() does
        return describe(scene, rng, self.spec.num_sub_captions)

    def load(self, index: int, rng: np.random.Generator):
        from compt.paradigms.clip.data.captions import sample_captions

        scene, srng = self.scene(index)
        image = render_tensor(scene, self.image_size, srng, self.spec)
        pool = describe(scene, srng, self.spec.num_sub_captions)
        return image, self.tokenize(sample_captions(pool, self.num_captions, rng))
