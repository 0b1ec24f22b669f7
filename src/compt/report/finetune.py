"""The report's fine-tuning table: transfer of each member, from the ``result.json`` files beside it.

``compt finetune`` files each run's result under its member's run folder,
``<member folder>/finetune/<set>/<variant>-seed<seed>/result.json`` (the schema is in
``compt.paradigms.clip.finetune.results``; this module reads only the keys ``kind``, ``set``,
``label``, ``seed``, ``test_top1``, ``train_macs``, ``num_classes``, ``num_train``, ``num_test``).
Per set, the table has one row per member and one column per variant (linear probe, full fine-tune,
AutoProg-Zero ...): the test top-1 over seeds as mean ± std [seeds], the baseline's in parentheses.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["finetune_results", "finetune_section"]

_ORDER = ("linear-probe", "full")  # then the progressive variants, alphabetically


def _member_folder(run: Any, member: dict[str, Any]) -> Path | None:
    rel = member.get("metrics_file") or member.get("export")
    return (run.root / rel).parent if rel else None


def finetune_results(run: Any, member: dict[str, Any]) -> list[dict[str, Any]]:
    """The fine-tuning results filed under one member of ``run`` (a :class:`compt.report.Run`)."""
    folder = _member_folder(run, member)
    if folder is None or not (folder / "finetune").is_dir():
        return []
    found = []
    for path in sorted((folder / "finetune").glob("*/*/result.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}); rerun its compt finetune command") from e
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "finetune"
            and isinstance(doc.get("test_top1"), (int, float))
        ):
            found.append(doc)
    return found


def _label_order(label: str) -> tuple[int, str]:
    return (_ORDER.index(label) if label in _ORDER else len(_ORDER), label)


def _cell(docs: list[dict[str, Any]]) -> str:
    if not docs:
        return "—"
    values = [d["test_top1"] for d in docs]
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.1f}{spread} [{len(values)}]"


def finetune_section(run: Any, baseline: Any | None = None) -> list[str]:
    """Markdown lines of the fine-tuning tables (none when no member has a result)."""
    by = defaultdict(list)  # (set, run kind, member, label) -> results
    for r in [run] + ([baseline] if baseline else []):
        for m in r.members:
            for doc in finetune_results(r, m):
                by[(doc["set"], r is baseline, m["name"], doc["label"])].append(doc)
    if not by:
        return []
    out = ["", "## Fine-tuning (compt finetune)", ""]
    for name in sorted({k[0] for k in by}):
        labels = sorted({k[3] for k in by if k[0] == name}, key=_label_order)
        some = next(d for k, docs in by.items() if k[0] == name for d in docs)
        out += [
            f"Set `{name}`: {some.get('num_classes')} classes, {some.get('num_train')} training / "
            f"{some.get('num_test')} test images. Test top-1 %, mean ± std [seeds]"
            + (f"; {baseline.label.lower()} in parentheses." if baseline else "."),
            "",
            "| Model | " + " | ".join(labels) + " |",
            "|" + "---|" * (len(labels) + 1),
        ]
        for m in run.members:
            cells = []
            for label in labels:
                ours, theirs = (
                    by.get((name, False, m["name"], label), []),
                    by.get((name, True, m["name"], label)),
                )
                cells.append(_cell(ours) + (f" ({_cell(theirs)})" if baseline and theirs else ""))
            out.append(f"| {m['name']} | " + " | ".join(cells) + " |")
        out.append("")
    return out[:-1]
