"""The issue-12 benchmark as a ``benchmarks/autoprog.py`` bench: AutoProg-One measured on it (issue 15).

Run from the repository root::

    .venv/bin/python benchmarks/autoprog.py --bench benchmarks/autoprog_bench.py:autoprog_bench \\
        --out benchmarks/results/autoprog-bench --set seeds='[0]'

Everything a run trains on is ``benchmarks/reproduce.py``'s protocol (as in ``recipe_bench.py``), so
AutoProg-One is scored against the same baselines docs/reproduce.md reports, on the same test split.
The baselines, the first member and the plain chain (the paper's recipe at 1/4 links) are reproduce's
finished runs, adopted with their weights, not retrained; the AutoProg runs are trained here.

The bench family is one layer deep, so AutoProg-One's growth space on it is the input resolution
only: linspace(0.5, 1, K) of the full 32 px on the patch-8 grid (16 / 24 / 32 px), every stage's depth
rounding to the one layer. What this measures is therefore the resolution half of AutoProg; and since
compt grows the model (MoGrow, the AdamW hand-over) only at a depth change, the manual-ramp arms with
MoGrow off or AdamW reset are the same run as the manual ramp here (results in docs/autoprog.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_bench import IssueTwelveBench  # noqa: E402


@dataclass(frozen=True)
class AutoProgOnBench(IssueTwelveBench):
    """The bench family on the patch-centred embedded set, plain vs AutoProg-One, by ``val_loss``."""

    name: str = "bench-autoprog"
    ablation_member: str = "bench-S"  # the options (manual, MoGrow, AdamW reset) on the cheapest link
    paper_arm: str = "chain"  # autoprog_lib's name of the plain chain: reproduce's chain
    train_first: bool = False  # nothing here grows AdamW moments: adopt reproduce's first member


def autoprog_bench() -> AutoProgOnBench:
    """The factory ``--bench benchmarks/autoprog_bench.py:autoprog_bench`` calls."""
    return AutoProgOnBench()
