"""The strategies of inverse weight initialization (paper App. D.1, Fig. A, Table H) and how they apply.

A width strategy maps one size to a larger one, ``fn(n_teacher, n_student, ctx) -> Map1D``: for each
student entry, which teacher entries (and weights) it comes from, or that it keeps its own init.
A paradigm's layout (:mod:`compt.grow.layout`) says which axis of which tensor is which space (heads x
head width, MLP units), and :func:`axis_map` composes the strategy over that structure, so a
strategy never needs to know about q/k/v packing or PatchMerging. A depth strategy,
``fn(n_teacher, n_student) -> [teacher layer or None per student layer]``, runs per tower and per
Swin stage. Both are registries: a new strategy is one decorated function, no edits elsewhere.

Two registration flags serve the function-preserving strategies of issue 13: ``noise_snr_db`` adds
symmetry-breaking noise along the axes whose :class:`Map1D` carries ``pairs`` (HyperCloning's +N/-N
pairs, which cancel in the consumer's sum), and ``masked`` asks the trainer to multiply every unit
the strategy leaves fresh by a mask ramped from 0 to 1 (MSG, :mod:`compt.grow.masks`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from compt.grow.layout import Axis, GrowError

__all__ = [
    "Map1D",
    "AxisContext",
    "WidthStrategy",
    "register_width",
    "register_depth",
    "list_width_strategies",
    "list_depth_strategies",
    "width_strategy",
    "depth_map",
    "axis_map",
    "grow_tensor",
]


# --- strategy registries -------------------------------------------------------------------------


@dataclass(frozen=True)
class Map1D:
    """Where each of ``n_s`` student entries of one axis comes from.

    ``src[j, k]`` / ``weight[j, k]``: entry ``j`` is ``sum_k weight[j, k] * teacher[src[j, k]]``;
    ``inherited[j]`` False keeps the student's own initialization (``src`` is then ignored).
    """

    src: torch.Tensor  # long [n_s, k]
    weight: torch.Tensor  # float [n_s, k]
    inherited: torch.Tensor  # bool [n_s]
    # float [n_s, P] or None: symmetry-breaking noise along this axis is pairs @ N for a random N of P
    # rows; each column must sum to 0 over the copies of one teacher entry (so a consumer's sum over
    # identical inputs is unchanged: HyperCloning's +N / -N pairs)
    pairs: torch.Tensor | None = None

    @staticmethod
    def select(src: torch.Tensor, inherited: torch.Tensor | None = None) -> Map1D:
        """Entry ``j`` copies teacher entry ``src[j]``."""
        ok = torch.ones(len(src), dtype=torch.bool) if inherited is None else inherited
        return Map1D(src[:, None].long(), torch.ones(len(src), 1), ok)

    def is_identity(self, n_t: int) -> bool:
        n_s = len(self.src)
        return (
            n_s == n_t
            and self.pairs is None
            and self.src.shape[1] == 1
            and bool(self.inherited.all())
            and bool((self.weight == 1).all())
            and torch.equal(self.src[:, 0], torch.arange(n_s))
        )


@dataclass(frozen=True)
class AxisContext:
    """What a width strategy may know about the space it maps."""

    key: str  # the space and part, e.g. "visual.3.heads/units"
    role: str  # "out": the tensor produces the space; "in": it consumes it (Net2Net splits these)
    normed: bool  # a LayerNorm (or CLIP's L2 norm) runs over this space
    seed: int

    def generator(self) -> torch.Generator:
        """A generator that gives the same draws for the same space and seed (in any tensor, any role)."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.key.encode()))


WidthFn = Callable[[int, int, AxisContext], Map1D]
DepthFn = Callable[[int, int], list]


@dataclass(frozen=True)
class WidthStrategy:
    name: str
    fn: WidthFn
    structured: bool  # False: every axis is one flat block (the official code's shape-only copy)
    inherits: bool = True  # False: no tensor is taken from the teacher, not even ones that cannot grow
    masked: bool = False  # True: fresh units are masked 0 -> 1 during training (MSG, compt.grow.masks)
    noise_snr_db: float | None = None  # noise along axes with `pairs`, this far below the grown weights


_WIDTH: dict[str, WidthStrategy] = {}
_DEPTH: dict[str, DepthFn] = {}


def register_width(
    name: str,
    *,
    structured: bool = True,
    inherits: bool = True,
    masked: bool = False,
    noise_snr_db: float | None = None,
) -> Callable[[WidthFn], WidthFn]:
    """Decorator: register ``fn(n_teacher, n_student, ctx) -> Map1D`` as width strategy ``name``.

    ``masked``: the trainer masks the entries the strategy leaves fresh (MSG); ``noise_snr_db``: noise
    is added along the axes whose map has ``pairs``, at this signal-to-noise ratio (HyperCloning).
    """

    def deco(fn: WidthFn) -> WidthFn:
        if name in _WIDTH:
            raise ValueError(f"width strategy {name!r} is already registered")
        _WIDTH[name] = WidthStrategy(name, fn, structured, inherits, masked, noise_snr_db)
        return fn

    return deco


def register_depth(name: str) -> Callable[[DepthFn], DepthFn]:
    """Decorator: register ``fn(n_teacher, n_student) -> list`` (teacher layer or None per student layer)."""

    def deco(fn: DepthFn) -> DepthFn:
        if name in _DEPTH:
            raise ValueError(f"depth strategy {name!r} is already registered")
        _DEPTH[name] = fn
        return fn

    return deco


def list_width_strategies() -> list[str]:
    return list(_WIDTH)


def list_depth_strategies() -> list[str]:
    return list(_DEPTH)


def _lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise GrowError(f"unknown {what} strategy {name!r}; known: {', '.join(registry)}")
    return registry[name]


def width_strategy(name: str) -> WidthStrategy:
    """The registered width strategy ``name`` (a :class:`GrowError` listing the known ones if absent)."""
    return _lookup(_WIDTH, name, "width")


# --- width strategies (Fig. A a-c, Table H) ------------------------------------------------------


@register_width("insert")
def insert(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """Fig. A(c), the paper's default: teacher entries lead, the rest keep the student's random init."""
    j = torch.arange(n_s)
    return Map1D.select(j.clamp(max=n_t - 1), j < n_t)


@register_width("duplicate")
def duplicate(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """Fig. A(a): the teacher tiled as often as it fits (the last copy cut off)."""
    return Map1D.select(torch.arange(n_s) % n_t)


@register_width("interpolate")
def interpolate(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """Fig. A(b): linear resampling per axis, i.e. bilinear on a matrix (as ``F.interpolate``,
    ``align_corners=False``)."""
    pos = ((torch.arange(n_s, dtype=torch.float64) + 0.5) * n_t / n_s - 0.5).clamp(0, n_t - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_t - 1)
    frac = (pos - lo).float()
    return Map1D(
        torch.stack([lo, hi], 1), torch.stack([1 - frac, frac], 1), torch.ones(n_s, dtype=torch.bool)
    )


@register_width("paper-compat", structured=False)
def paper_compat(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """The official code's top-left block copy, bug for bug: axes are flat, so packed q/k/v, heads and
    PatchMerging neighbours are misaligned when widths differ. Only for reproducing the paper's numbers."""
    return insert(n_t, n_s, ctx)


@register_width("net2net")
def net2net(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """Net2WiderNet (Chen et al. 2015; Table H): new units copy teacher units, the consumers of a copied
    unit split its outgoing weight by the number of copies, so the function is unchanged.

    Units under a LayerNorm are copied round-robin, so that with an integer ratio every unit has the
    same number of copies and the norm's mean and variance stay the same; other units are drawn at
    random (seeded), as in Net2Net.
    """
    g = torch.arange(n_s)
    if n_s > n_t:
        extra = (
            torch.arange(n_t, n_s) % n_t
            if ctx.normed
            else torch.randint(n_t, (n_s - n_t,), generator=ctx.generator())
        )
        g[n_t:] = extra
    weight = torch.ones(n_s)
    if ctx.role == "in":
        weight = 1.0 / torch.bincount(g, minlength=n_t)[g].float()
    return Map1D(g[:, None], weight[:, None], torch.ones(n_s, dtype=torch.bool))


def _cancelling_pairs(g: torch.Tensor, n_t: int) -> torch.Tensor:
    """[n_s, P]: +1 / -1 on consecutive copies of each teacher entry (copies 0 and 1, 2 and 3, ...);
    an odd copy out gets no noise. Every column sums to 0 over the copies of its teacher entry."""
    columns = []
    for unit in range(n_t):
        copies = (g == unit).nonzero()[:, 0]
        for a, b in zip(copies[0::2], copies[1::2], strict=False):
            col = torch.zeros(len(g))
            col[a], col[b] = 1.0, -1.0
            columns.append(col)
    return torch.stack(columns, 1) if columns else torch.zeros(len(g), 0)


@register_width("hypercloning", noise_snr_db=10.0)
def hypercloning(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """HyperCloning (Samragh et al. 2024, apple/ml-hypercloning): unit j copies teacher unit j mod n_t,
    a consumer's weights are split over the copies (``W.repeat(n, n) / n`` for an integer ratio n), and
    +N / -N noise pairs on a consumer's copies break their symmetry while summing to 0, so the output
    stays exact (the noise at 10 dB below the weights, the paper's SNR).

    Exact where every unit of a normalized space has the same number of copies (an integer width
    ratio: LayerNorm means and variances, and CLIP's cosine similarities, are unchanged) and the head
    width is kept; the layout's notes say where a pair of members breaks that.
    """
    g = torch.arange(n_s) % n_t
    if ctx.role == "out":
        return Map1D.select(g)
    weight = 1.0 / torch.bincount(g, minlength=n_t)[g].float()
    return Map1D(g[:, None], weight[:, None], torch.ones(n_s, dtype=torch.bool), _cancelling_pairs(g, n_t))


@register_width("msg", masked=True)
def msg(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """MSG (Yao et al. 2024, cofe-ai/MSG): the teacher in the leading entries (as ``insert``), every
    new unit's output multiplied by a mask ramped 0 -> 1 during training (:mod:`compt.grow.masks`), so
    the grown model computes its teacher's function whatever the new weights are."""
    return insert(n_t, n_s, ctx)


@register_width("none", inherits=False)
def none_width(n_t: int, n_s: int, ctx: AxisContext) -> Map1D:
    """No growth (the "IFD only" ablation, Table 4b): every student entry keeps its own init, and
    tensors that cannot grow (``logit_scale``) are not copied either."""
    return Map1D.select(torch.zeros(n_s), torch.zeros(n_s, dtype=torch.bool))


# --- depth strategies (Fig. A d-f) ---------------------------------------------------------------


@register_depth("duplicate")
def duplicate_depth(n_t: int, n_s: int) -> list[int | None]:
    """Fig. A(f), the paper's default: teacher layer i fills the next student layers in order
    (12 -> 24: 0,0,1,1,...,11,11); a ratio that is not an integer is spread evenly."""
    return [layer * n_t // n_s for layer in range(n_s)]


@register_depth("interval")
def interval_depth(n_t: int, n_s: int) -> list[int | None]:
    """Fig. A(e): teacher layer i goes to student layer ceil(i * q / p); layers in between stay fresh."""
    first = {-(-i * n_s // n_t): i for i in range(n_t)}
    return [first.get(layer) for layer in range(n_s)]


@register_depth("constant")
def constant_depth(n_t: int, n_s: int) -> list[int | None]:
    """Fig. A(d): the teacher's p layers fill the first p student layers; the rest stay fresh."""
    return [layer if layer < n_t else None for layer in range(n_s)]


@register_depth("none")
def none_depth(n_t: int, n_s: int) -> list[int | None]:
    """No growth (the "IFD only" ablation): every student layer stays fresh."""
    return [None] * n_s


def depth_map(name: str, n_t: int, n_s: int) -> list[int | None]:
    """The depth map of strategy ``name``: for each student layer, its teacher layer (``None``: fresh)."""
    out = list(_lookup(_DEPTH, name, "depth")(n_t, n_s))
    if len(out) != n_s or any(i is not None and not 0 <= i < n_t for i in out):
        raise GrowError(
            f"depth strategy {name!r} returned {out} for {n_t} -> {n_s} layers; "
            f"it must give {n_s} entries, each a teacher layer in 0..{n_t - 1} or None"
        )
    return out


# --- applying a strategy to a tensor ---------------------------------------------------------------------


def axis_map(
    axis: Axis, n_t: int, n_s: int, strategy: WidthStrategy, seed: int, cache: dict, where: str
) -> Map1D | None:
    """The map of one tensor axis, composed from its space's unit and dim maps and its groups."""
    sp = axis.space
    if sp is None:
        if n_t != n_s:
            raise GrowError(f"{where}: teacher size {n_t} != student size {n_s} on an axis that cannot grow")
        return None
    if not strategy.structured:
        return _space_map(strategy, f"{sp.key}/flat", axis.role, False, n_t, n_s, seed, cache)
    ut, us = sp.units_t, sp.units_s
    dt, ds = (sp.dims_t, sp.dims_s) if axis.with_dims else (1, 1)
    if (axis.groups * ut * dt, axis.groups * us * ds) != (n_t, n_s):
        raise GrowError(
            f"{where}: sizes {n_t} -> {n_s} do not match {axis.groups} x {ut}x{dt} -> "
            f"{axis.groups} x {us}x{ds} of space {sp.key}; the state dict and its config disagree"
        )
    mu = _space_map(strategy, f"{sp.key}/units", axis.role, sp.normed, ut, us, seed, cache)
    md = _space_map(strategy, f"{sp.key}/dims", axis.role, False, dt, ds, seed, cache)
    ku, kd = mu.src.shape[1], md.src.shape[1]
    src = (mu.src[:, None, :, None] * dt + md.src[None, :, None, :]).reshape(us * ds, ku * kd)
    w = (mu.weight[:, None, :, None] * md.weight[None, :, None, :]).reshape(us * ds, ku * kd)
    ok = (mu.inherited[:, None] & md.inherited[None, :]).reshape(-1)
    offsets = (torch.arange(axis.groups) * ut * dt)[:, None, None]
    src = (src[None] + offsets).reshape(-1, ku * kd)
    m = Map1D(
        src, w.repeat(axis.groups, 1), ok.repeat(axis.groups), _compose_pairs(mu, md, us, ds, axis.groups)
    )
    return None if m.is_identity(n_t) else m


def _compose_pairs(mu: Map1D, md: Map1D, us: int, ds: int, groups: int) -> torch.Tensor | None:
    """Noise pairs of a (units x dims) axis: unit pairs for each dim, dim pairs within each unit,
    block-diagonal over packed groups (each group is a separate input, e.g. a PatchMerging neighbour)."""
    cols = []
    if mu.pairs is not None and mu.pairs.shape[1]:
        cols.append(torch.kron(mu.pairs, torch.eye(ds)))
    if md.pairs is not None and md.pairs.shape[1]:
        cols.append(torch.kron(torch.eye(us), md.pairs))
    if not cols:
        return None
    return torch.block_diag(*[torch.cat(cols, 1)] * groups)


def _space_map(strategy, key, role, normed, n_t, n_s, seed, cache) -> Map1D:
    k = (key, role, n_t, n_s)
    if k not in cache:
        m = strategy.fn(n_t, n_s, AxisContext(key, role, normed, seed))
        bad_pairs = m.pairs is not None and (m.pairs.dim() != 2 or m.pairs.shape[0] != n_s)
        if bad_pairs or m.src.shape[0] != n_s or (m.src.numel() and (m.src.min() < 0 or m.src.max() >= n_t)):
            raise GrowError(f"width strategy {strategy.name!r} returned a bad map for {key} ({n_t} -> {n_s})")
        cache[k] = m
    return cache[k]


def grow_tensor(
    t_val: torch.Tensor,
    s_val: torch.Tensor,
    maps: list[Map1D | None],
    in_place: bool,
    noise: tuple[float, torch.Generator] | None = None,
) -> tuple[torch.Tensor, int]:
    """The student tensor grown from ``t_val`` by per-axis ``maps`` (``None``: axis unchanged), and the
    number of entries inherited. Entries not inherited keep ``s_val``'s values; ``in_place`` writes
    into ``s_val`` instead of a copy. ``noise=(snr_db, generator)`` adds the symmetry-breaking noise
    of the maps' ``pairs``, ``snr_db`` below the grown values' power."""
    out, rows = _gather(t_val.detach().to(device=s_val.device, dtype=torch.float32), maps)
    if noise is not None:
        out = out + _pair_noise(out, maps, rows, *noise)
    out = out.to(s_val.dtype)
    if all(r is None for r in rows):  # every entry inherited
        if in_place:
            return s_val.detach().copy_(out), out.numel()
        same = (
            out.device.type != "meta"
            and out.untyped_storage().data_ptr() == t_val.untyped_storage().data_ptr()
        )
        return (out.clone() if same else out), out.numel()
    result = s_val.detach() if in_place else s_val.detach().clone()
    _scatter(result, rows, out)
    return result, out.numel()


def _gather(out: torch.Tensor, maps: list[Map1D | None]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The teacher values of the inherited student entries, and per axis their student positions
    (``None``: all of them; positions stay on the CPU, where the decisions are made)."""
    rows: list[torch.Tensor | None] = []
    dev = out.device
    for d, m in enumerate(maps):
        if m is None:
            rows.append(None)
            continue
        keep = m.inherited.nonzero()[:, 0]
        src, w = m.src[keep], m.weight[keep]
        if src.shape[1] > 1 or not bool((w == 1).all()):
            view = [-1 if i == d else 1 for i in range(out.dim())]
            out = sum(
                w[:, k].to(dev).view(view) * out.index_select(d, src[:, k].to(dev))
                for k in range(src.shape[1])
            )
        elif not _is_range(src[:, 0], out.shape[d]):  # insert keeps whole teacher axes in order: no copy
            out = out.index_select(d, src[:, 0].to(dev))
        rows.append(None if len(keep) == len(m.inherited) else keep)
    return out, rows


def _pair_noise(
    out: torch.Tensor, maps: list[Map1D | None], rows: list, snr_db: float, generator: torch.Generator
) -> torch.Tensor:
    """Noise with ``pairs @ N`` along each axis that has pairs (restricted to the inherited rows)."""
    noise = torch.zeros_like(out)
    std = out.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)  # 10 dB: noise power a tenth of the signal's
    for d, m in enumerate(maps):
        if m is None or m.pairs is None or not m.pairs.shape[1]:
            continue
        pairs = m.pairs if rows[d] is None else m.pairs[rows[d]]
        shape = list(out.shape)
        shape[d] = pairs.shape[1]
        draw = torch.randn(shape, generator=generator).to(out.device) * std
        noise += torch.movedim(torch.movedim(draw, d, -1) @ pairs.T.to(out.device), -1, d)
    return noise


def _scatter(result: torch.Tensor, rows: list[torch.Tensor | None], out: torch.Tensor) -> None:
    """Write ``out`` into ``result`` at the positions ``rows`` (per axis; ``None``: all)."""
    # Leading blocks (the common case for insert) go through a narrowed view, one scattered axis
    # through index_copy_, several through advanced indexing.
    target, scattered = result, []
    for d, r in enumerate(rows):
        if r is not None and _is_range(r, len(r)):
            target = target.narrow(d, 0, len(r))
        elif r is not None:
            scattered.append(d)
    dev = result.device
    if not scattered:
        target.copy_(out)
    elif len(scattered) == 1:
        target.index_copy_(scattered[0], rows[scattered[0]].to(dev), out)
    else:
        index = [rows[d] if d in scattered else torch.arange(n) for d, n in enumerate(target.shape)]
        view = [[-1 if i == d else 1 for i in range(out.dim())] for d in range(out.dim())]
        target[tuple(ix.to(dev).view(v) for ix, v in zip(index, view, strict=True))] = out


def _is_range(idx: torch.Tensor, n: int) -> bool:
    """``idx`` (on the CPU) is exactly ``0, 1, ..., n - 1``."""
    return len(idx) == n and torch.equal(idx, torch.arange(n))
