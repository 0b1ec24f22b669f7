"""Is a member lossless against its individually trained twin? The paper's test (§4) and when it can't tell.

Lossless (paper §4): the member is less than ``LOSSLESS_POINTS`` (0.5) points below its twin on
every metric. Metrics differ in direction and unit (issue 12 item 5): an accuracy in % is better
higher, a validation loss in nats better lower. Each metric is therefore compared through a
:class:`MetricRule` — its direction, its :class:`Tolerance` and its unit — that the paradigm gives
(:meth:`compt.paradigms.Paradigm.higher_is_better`, ``lossless_tolerance``, ``metric_unit``) and
``summary.json`` records, so that :func:`shortfall` (how much worse, in the metric's own units,
positive when worse) is the one gap everything reports: Table 2, ``until_lossless``, the verdicts.
The default tolerances: ``LOSSLESS_POINTS`` for a percentage (the paper's), ``LOSSLESS_NATS`` for a
loss in nats (0.01 nats: the member's geometric-mean likelihood of the right answer is within 1 %
of its twin's, exp(-0.01) = 0.990).

Two comparisons pass that test and say nothing, so they are named instead (issue 11 item 6):

* **results at chance.** A member and its twin that both score what a blind guess scores (the
  ``chance/<key>`` levels of :mod:`compt.paradigms.clip.evaluate`) have a gap of ~0 points and would read as
  "lossless" (paper §4: Δ ≥ −0.5) although neither learned the task. A value is *at chance* when it
  is less than ``max(CHANCE_MARGIN_POINTS, CHANCE_MARGIN_FRACTION * chance)`` above its chance level:
  ~4 standard errors of the embedded tasks' mean top-1 (4 tasks x 500 images), and a band that
  grows with the level where few classes make a guess score high. A loss is at chance when it is
  less than ``CHANCE_MARGIN_LOSS_FRACTION`` (1 %) of its chance level below it (a contrastive loss's
  chance is ln(batch): the loss of embeddings that say nothing).
* **a baseline trained on other data**, or scored on other eval sets. The paper's lossless claim
  compares twins trained on the same data (§4); ``summary.json`` holds both runs' configs, so a
  difference in ``data`` or ``eval`` is found and named instead of rendered as a gap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "LOSSLESS_POINTS",
    "LOSSLESS_NATS",
    "CHANCE_PREFIX",
    "CHANCE_MARGIN_POINTS",
    "CHANCE_MARGIN_FRACTION",
    "CHANCE_MARGIN_LOSS_FRACTION",
    "Tolerance",
    "MetricRule",
    "shortfall",
    "is_lossless",
    "chance_level",
    "at_chance",
    "config_differences",
    "comparable",
    "gap",
    "verdict",
    "comparison_warnings",
]

LOSSLESS_POINTS = 0.5  # paper §4: lossless = less than 0.5 points below the baseline
LOSSLESS_NATS = 0.01  # a loss in nats: within 1 % of the twin's likelihood (module docstring)
CHANCE_MARGIN_POINTS = 1.0
CHANCE_MARGIN_FRACTION = 0.25
CHANCE_MARGIN_LOSS_FRACTION = 0.01
# The key an evaluator writes a metric's chance level under (the CLIP evaluator's CHANCE_PREFIX); a literal
# here, so that reports stay independent of the paradigm that produced the numbers.
CHANCE_PREFIX = "chance/"
# Config fields that change neither the training data nor what is measured on it.
_IGNORED = {"data": {"workers"}, "eval": {"every_steps", "metric", "periodic"}}


@dataclass(frozen=True)
class Tolerance:
    """How much worse than its twin a member may be and still count as lossless.

    The allowed shortfall is ``max(absolute, relative * |twin's value|)``, in the metric's own units
    (points for a percentage, nats for a loss).
    """

    absolute: float = 0.0  # in the metric's units
    relative: float = 0.0  # a fraction of the twin's value (0.002: 0.2 % of the twin's loss)

    def __post_init__(self) -> None:
        for name in ("absolute", "relative"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"the {name} tolerance must be a finite number >= 0, got {value!r}")
        if self.relative >= 1:
            raise ValueError(
                f"a relative lossless tolerance is a fraction of the twin's value, got {self.relative} "
                "(>= 1 would call anything lossless); 0.002 is 0.2 %"
            )

    def allowed(self, reference: float) -> float:
        """The largest shortfall against a twin that scored ``reference`` still counted lossless."""
        return max(self.absolute, self.relative * abs(reference))

    def describe(self, unit: str = "") -> str:
        """In words: ``0.5 points``, ``0.01 nats``, ``0.2 % of the baseline`` (or the larger of two)."""
        absolute = f"{self.absolute:g}" + (f" {'points' if unit == '%' else unit}" if unit else "")
        relative = f"{100 * self.relative:g} % of the baseline"
        if self.relative and self.absolute:
            return f"the larger of {absolute} and {relative}"
        return relative if self.relative else absolute

    def to_dict(self) -> dict[str, float]:
        return {"absolute": float(self.absolute), "relative": float(self.relative)}


@dataclass(frozen=True)
class MetricRule:
    """How one metric is compared: its direction, the tolerance of a lossless verdict, its unit."""

    higher_is_better: bool = True
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(absolute=LOSSLESS_POINTS))
    unit: str = ""  # "%", "nats", ...; "" when unknown

    def to_dict(self) -> dict[str, Any]:
        """The ``summary.json`` form (``metric_rules`` entry), read back by :meth:`from_dict`."""
        return {
            "higher_is_better": self.higher_is_better,
            "tolerance": self.tolerance.to_dict(),
            "unit": self.unit,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> MetricRule:
        tol = doc.get("tolerance") or {}
        return cls(
            higher_is_better=bool(doc.get("higher_is_better", True)),
            tolerance=Tolerance(float(tol.get("absolute", 0.0)), float(tol.get("relative", 0.0))),
            unit=str(doc.get("unit", "")),
        )


def shortfall(reference: float, value: float, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``reference``, in the metric's units (negative: better).

    ``reference - value`` for an accuracy, ``value - reference`` for a loss: the gap of every lossless
    comparison, positive when the member is worse than its twin (issue 12 item 5).
    """
    return reference - value if higher_is_better else value - reference


def is_lossless(value: float, reference: float, rule: MetricRule) -> bool:
    """Whether ``value`` is within ``rule``'s tolerance of its twin's ``reference`` (NaN: never)."""
    return shortfall(reference, value, rule.higher_is_better) <= rule.tolerance.allowed(reference)


def chance_level(metrics: dict[str, Any], key: str) -> float | None:
    """The chance level of metric ``key`` recorded beside it, or None (results written before it)."""
    value = metrics.get(CHANCE_PREFIX + key)
    return float(value) if isinstance(value, (int, float)) else None


def at_chance(metrics: dict[str, Any], key: str, higher_is_better: bool = True) -> bool:
    """True when ``metrics[key]`` is within the chance band of its recorded chance level."""
    value, chance = metrics.get(key), chance_level(metrics, key)
    if not isinstance(value, (int, float)) or chance is None:
        return False
    if not higher_is_better:  # a loss learns downwards from its chance level
        return chance - value < CHANCE_MARGIN_LOSS_FRACTION * abs(chance)
    return value - chance < max(CHANCE_MARGIN_POINTS, CHANCE_MARGIN_FRACTION * chance)


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def config_differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``section.field: ours vs theirs`` for each ``data``/``eval`` field two run configs disagree on.

    Sections a config lacks (a summary written by another tool) are not compared.
    """
    out = []
    for section, ignored in _IGNORED.items():
        if not isinstance(ours.get(section), dict) or not isinstance(theirs.get(section), dict):
            continue
        a, b = _flatten(ours[section], section), _flatten(theirs[section], section)
        for key in sorted(a.keys() | b.keys()):
            if key.split(".")[1] in ignored or a.get(key) == b.get(key):
                continue
            out.append(f"{key}: {a.get(key, '(unset)')!r} vs {b.get(key, '(unset)')!r}")
    return out


def comparable(ours: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """True when two ``summary.json`` documents trained and evaluated on the same data."""
    return not config_differences(ours.get("config") or {}, theirs.get("config") or {})


def gap(m: dict[str, Any], b: dict[str, Any] | None, key: str, higher_is_better: bool = True) -> float | None:
    """How much worse member ``m`` is than its twin ``b`` on ``key`` (:func:`shortfall`), or None."""
    ours, base = m["metrics"].get(key), (b["metrics"].get(key) if b else None)
    if not isinstance(ours, (int, float)) or not isinstance(base, (int, float)):
        return None
    return shortfall(base, ours, higher_is_better)


def verdict(
    m: dict[str, Any],
    b: dict[str, Any] | None,
    keys: list[str],
    same_data: bool,
    rules: Mapping[str, MetricRule] | None = None,
) -> str:
    """The Lossless cell of member ``m`` against its twin ``b``: yes / no, or why it cannot tell.

    Each metric is judged by its rule (direction and tolerance; default: a percentage, 0.5 points).
    A metric on which both are at chance has a gap of noise: it can show neither a loss nor its
    absence, so it is left out of the verdict and named; with none left the verdict is n/a.
    """
    if b is None:
        return "no"
    if not same_data:
        return "n/a (different data)"
    rules = rules or {}
    rule = {k: rules.get(k, MetricRule()) for k in keys}
    told = [
        k
        for k in keys
        if not (
            at_chance(m["metrics"], k, rule[k].higher_is_better)
            and at_chance(b["metrics"], k, rule[k].higher_is_better)
        )
    ]
    if not told:
        return "n/a (both at chance)"
    ok = all(
        isinstance(m["metrics"].get(k), (int, float))
        and isinstance(b["metrics"].get(k), (int, float))
        and is_lossless(m["metrics"][k], b["metrics"][k], rule[k])
        for k in told
    )
    blind = [k for k in keys if k not in told]
    return ("yes" if ok else "no") + (f" ({', '.join(blind)} at chance)" if blind else "")


class _Run(Protocol):  # the fields of compt.report.Run read here
    root: Any
    summary: dict[str, Any]
    label: str
    members: list[dict[str, Any]]

    def member(self, name: str) -> dict[str, Any] | None: ...


def comparison_warnings(
    run: _Run, baseline: _Run | None, keys: list[str], rules: Mapping[str, MetricRule] | None = None
) -> list[str]:
    """One sentence per reason the report's gaps or verdicts on ``keys`` may mean nothing."""
    out = []
    rules = rules or {}
    if baseline is not None:
        diff = config_differences(run.summary.get("config") or {}, baseline.summary.get("config") or {})
        if diff:
            out.append(
                f"the baseline `{baseline.root}` was trained or evaluated on other data than `{run.root}` "
                f"({'; '.join(diff)}): its gaps compare unlike runs, so no member is judged lossless. Train "
                "the baseline with the same data and eval sections (compt chain run SPEC --individual)."
            )
    for m in run.members:
        b = baseline.member(m["name"]) if baseline else None
        for k in keys:
            rule = rules.get(k, MetricRule())
            if not at_chance(m["metrics"], k, rule.higher_is_better):
                continue
            both = b and at_chance(b["metrics"], k, rule.higher_is_better)
            who = f"{run.label} and baseline are" if both else f"{run.label} is"
            d = 2 if rule.unit == "%" else 3
            out.append(
                f"{m['name']}: {who} at chance on {k} ({m['metrics'][k]:.{d}f} vs chance "
                f"{chance_level(m['metrics'], k):.{d}f}): the member has not learned what it measures "
                "(train longer, or evaluate on a task it can learn)."
            )
    return out
