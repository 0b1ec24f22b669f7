"""Is a member lossless against its individually trained twin? The paper's test (§4) and when it can't tell.

Lossless (paper §4): the member is less than ``LOSSLESS_POINTS`` (0.5) points below its twin on
every metric. Two comparisons pass that test and say nothing, so they are named instead
(issue 11 item 6):

* **results at chance.** A member and its twin that both score what a blind guess scores (the
  ``chance/<key>`` levels of :mod:`compt.paradigms.clip.evaluate`) have a gap of ~0 points and would read as
  "lossless" (paper §4: Δ ≥ −0.5) although neither learned the task. A value is *at chance* when it
  is less than ``max(CHANCE_MARGIN_POINTS, CHANCE_MARGIN_FRACTION * chance)`` above its chance level:
  ~4 standard errors of the embedded tasks' mean top-1 (4 tasks x 500 images), and a band that
  grows with the level where few classes make a guess score high.
* **a baseline trained on other data**, or scored on other eval sets. The paper's lossless claim
  compares twins trained on the same data (§4); ``summary.json`` holds both runs' configs, so a
  difference in ``data`` or ``eval`` is found and named instead of rendered as a gap.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = [
    "LOSSLESS_POINTS",
    "CHANCE_PREFIX",
    "CHANCE_MARGIN_POINTS",
    "CHANCE_MARGIN_FRACTION",
    "chance_level",
    "at_chance",
    "config_differences",
    "comparable",
    "gap",
    "verdict",
    "comparison_warnings",
]

LOSSLESS_POINTS = 0.5  # paper §4: lossless = less than 0.5 points below the baseline
CHANCE_MARGIN_POINTS = 1.0
CHANCE_MARGIN_FRACTION = 0.25
# The key an evaluator writes a metric's chance level under (the CLIP evaluator's CHANCE_PREFIX); a literal
# here, so that reports stay independent of the paradigm that produced the numbers.
CHANCE_PREFIX = "chance/"
# Config fields that change neither the training data nor what is measured on it.
_IGNORED = {"data": {"workers"}, "eval": {"every_steps", "metric"}}


def chance_level(metrics: dict[str, Any], key: str) -> float | None:
    """The chance level of metric ``key`` recorded beside it, or None (results written before it)."""
    value = metrics.get(CHANCE_PREFIX + key)
    return float(value) if isinstance(value, (int, float)) else None


def at_chance(metrics: dict[str, Any], key: str) -> bool:
    """True when ``metrics[key]`` is within the chance band above its recorded chance level."""
    value, chance = metrics.get(key), chance_level(metrics, key)
    if not isinstance(value, (int, float)) or chance is None:
        return False
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


def gap(m: dict[str, Any], b: dict[str, Any] | None, key: str) -> float | None:
    """``m``'s metric ``key`` minus its twin ``b``'s, in points (None if either lacks it)."""
    ours, base = m["metrics"].get(key), (b["metrics"].get(key) if b else None)
    return ours - base if ours is not None and base is not None else None


def verdict(m: dict[str, Any], b: dict[str, Any] | None, keys: list[str], same_data: bool) -> str:
    """The Lossless cell of member ``m`` against its twin ``b``: yes / no, or why it cannot tell.

    A metric on which both are at chance has a gap of noise: it can show neither a loss nor its
    absence, so it is left out of the verdict and named; with none left the verdict is n/a.
    """
    if b is None:
        return "no"
    if not same_data:
        return "n/a (different data)"
    told = [k for k in keys if not (at_chance(m["metrics"], k) and at_chance(b["metrics"], k))]
    if not told:
        return "n/a (both at chance)"
    ok = all((d := gap(m, b, k)) is not None and d >= -LOSSLESS_POINTS for k in told)
    blind = [k for k in keys if k not in told]
    return ("yes" if ok else "no") + (f" ({', '.join(blind)} at chance)" if blind else "")


class _Run(Protocol):  # the fields of compt.report.Run read here
    root: Any
    summary: dict[str, Any]
    label: str
    members: list[dict[str, Any]]

    def member(self, name: str) -> dict[str, Any] | None: ...


def comparison_warnings(run: _Run, baseline: _Run | None, keys: list[str]) -> list[str]:
    """One sentence per reason the report's gaps or verdicts on ``keys`` may mean nothing."""
    out = []
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
            if not at_chance(m["metrics"], k):
                continue
            who = f"{run.label} and baseline are" if b and at_chance(b["metrics"], k) else f"{run.label} is"
            out.append(
                f"{m['name']}: {who} at chance on {k} ({m['metrics'][k]:.2f} vs chance "
                f"{chance_level(m['metrics'], k):.2f}): the member has not learned what it measures "
                "(train longer, or evaluate on a task it can learn)."
            )
    return out
