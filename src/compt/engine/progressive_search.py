"""AutoProg-One's one-shot growth-schedule search (Li et al., CVPR 2022; journal arXiv 2410.00350), the
model-free parts: which sub-net of the elastic supernet a candidate runs, which candidate a step trains,
and which candidate wins.

At a growth, AutoProg trains an elastic supernet (the deepest candidate, grown by adjacent duplication)
for a short search phase; each step trains one candidate (a depth and an input resolution), and a
shallower candidate skips duplicated layers, running them as identity. Afterwards every candidate gets
a step time ``T`` and a loss ``L``; AutoProg fits ``L ~ a * T^b`` over the candidates and picks
``argmin L * T^w`` with ``w = max(-b, 0)`` (official code, main_prog.py:1741-1767). The candidates
themselves and the models live in :mod:`compt.engine.progressive` and
:mod:`compt.paradigms.clip.progressive`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from compt.grow import depth_map

__all__ = ["supernet_keep", "sample_candidate", "SearchResult", "fit_power_law", "choose_candidate"]

C = TypeVar("C", bound=Hashable)


def supernet_keep(base: int, depth: int, layers: int) -> list[int]:
    """The supernet blocks a sub-net of ``layers`` blocks runs (the others are skipped as identity).

    The supernet's ``depth`` blocks were grown from ``base`` blocks by compt.grow's adjacent duplication
    (``depth_map("duplicate", base, depth)``, e.g. 3 -> 6 is 0,0,1,1,2,2), so each base block has one
    or two copies. A sub-net keeps the first copy of every base block and ``layers - base`` second
    copies, spread evenly over the depth (the official code keeps the last ones, volo.py:609; spreading
    them keeps each extracted sub-net an even duplication of its base). ``layers == base`` runs the base
    network, ``layers == depth`` the whole supernet.
    """
    if not 1 <= base <= layers <= depth <= 2 * base:
        raise ValueError(
            f"a sub-net of {layers} blocks of a {depth}-block supernet grown from {base} blocks needs "
            f"1 <= base <= layers <= depth <= 2 * base (duplication makes at most two copies per block)"
        )
    source = depth_map("duplicate", base, depth)
    firsts = [i for i in range(depth) if i == 0 or source[i] != source[i - 1]]
    seconds = [i for i in range(depth) if i > 0 and source[i] == source[i - 1]]
    extra = layers - base
    picks = [seconds[(2 * j + 1) * len(seconds) // (2 * extra)] for j in range(extra)]
    return sorted(firsts + picks)


def sample_candidate(candidates: Sequence[C], index: int, seed: str) -> C:
    """The candidate that search step ``index`` trains: a pure function of ``(seed, index)``.

    Every rank computes the same candidate without communicating, and a resumed run continues the
    same sequence. The official code draws uniformly (``random.seed(epoch)``, main_prog.py:1861);
    here the steps run through the candidates in shuffled rounds, so that a short search trains
    every candidate equally often.
    """
    if not candidates:
        raise ValueError("sample_candidate needs at least one candidate")
    n = len(candidates)
    order = list(range(n))
    random.Random(f"{seed}/{index // n}").shuffle(order)
    return candidates[order[index % n]]


@dataclass(frozen=True)
class SearchResult:
    """The outcome of one search: the choice, the fitted exponent and every candidate's score."""

    choice: Hashable
    exponent: float  # b of L ~ a * T^b (0 when fewer than two distinct T)
    weight: float  # w = max(-b, 0)
    scores: dict  # candidate -> L * T^w (inf for a candidate whose loss is not finite)


def fit_power_law(costs: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """``(a, b)`` of ``L ~ a * T^b`` by least squares in log-log space (a line through (log T, log L)).

    The official code fits in linear space with scipy's curve_fit; the log-log fit has a closed form
    and weighs every candidate by its relative error. Fewer than two distinct costs give ``b = 0``.
    """
    t, loss = np.asarray(costs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if t.shape != loss.shape or not len(t):
        raise ValueError(f"fit_power_law needs as many costs as losses (got {len(t)} and {len(loss)})")
    if (t <= 0).any() or (loss <= 0).any():
        raise ValueError("fit_power_law needs positive costs and losses (it fits in log space)")
    x, y = np.log(t), np.log(loss)
    if np.ptp(x) == 0:
        return float(np.exp(y.mean())), 0.0
    b, log_a = np.polyfit(x, y, 1)
    return float(np.exp(log_a)), float(b)


def choose_candidate(costs: Mapping[C, float], losses: Mapping[C, float]) -> SearchResult:
    """AutoProg's choice: fit ``L ~ a * T^b``, ``w = max(-b, 0)``, return ``argmin L * T^w``.

    ``costs`` is each candidate's step time T (MACs or seconds: only ratios matter), ``losses`` its
    loss L after the search. When loss falls with cost (``b < 0``) the score trades them off at the
    rate the candidates themselves show; otherwise ``w = 0`` and the lowest loss wins. A candidate
    whose loss is not finite (it diverged) is never chosen and stays out of the fit. Of equal scores
    the cheaper candidate wins.
    """
    if set(costs) != set(losses):
        raise ValueError("choose_candidate needs a cost and a loss for the same candidates")
    finite = [c for c in costs if math.isfinite(losses[c])]
    if not finite:
        raise ValueError("every candidate's search loss is NaN/inf: the search phase diverged")
    _, b = fit_power_law([costs[c] for c in finite], [losses[c] for c in finite])
    w = max(-b, 0.0)
    scores = {c: losses[c] * costs[c] ** w if c in finite else math.inf for c in costs}
    choice = min(finite, key=lambda c: (scores[c], costs[c]))
    return SearchResult(choice=choice, exponent=b, weight=w, scores=scores)
