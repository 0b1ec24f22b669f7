"""A fine-tune's result file, ``<out_dir>/result.json``, what ``compt report`` tabulates (issue 16).

One JSON object per run, written atomically when the run ends (its presence means "finished")::

    {
      "kind": "finetune",
      "label": "full",                 # linear-probe | full | autoprog-zero-{search,manual}[-sid]
      "mode": "full", "progressive": null,
      "member": "bench-M",             # the member fine-tuned (from its checkpoint)
      "checkpoint": "runs/demo/chain/bench-M/final.pt",
      "set": "shape",                  # the set's name (the folder above train/), train_dir, test_dir
      "seed": 0,
      "test_top1": 31.8,               # %, on the test split, at the member's full resolution
      "val_top1": null,                # %, on the held-out part of the training set (val_fraction > 0)
      "zero_shot_top1": 20.0,          # %, the zero-shot-initialized head before the first step
      "num_train": 2000, "num_test": 1000, "num_classes": 6,
      "train_macs": 1.75e11,           # exact training MACs (App. C.2), AutoProg-Zero's search included
      "wall_s": 27.7, "steps": 240,
      "stages": [...] | null,          # AutoProg-Zero: per stage its level, px, how chosen, proxies
      "probe": {...} | null,           # linear probe: chosen C, validation scores, fits not converged
      "config": {...}                  # the FinetuneConfig as a plain dict
    }

``compt report`` finds these files under ``<member folder>/finetune/`` of the members of a chain
or individual run (the default ``out_dir`` puts them there); it reads only this file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from compt.config import to_dict
from compt.paradigms.clip.finetune.config import FinetuneConfig, set_name

__all__ = ["RESULT_NAME", "FinetuneResult", "write_result", "read_result"]

RESULT_NAME = "result.json"


@dataclass(frozen=True)
class FinetuneResult:
    """A finished fine-tune (the fields of ``result.json``, see the module docstring)."""

    label: str
    mode: str
    progressive: str | None
    member: str | None
    checkpoint: str
    set: str
    train_dir: str
    test_dir: str
    seed: int
    test_top1: float
    num_train: int
    num_test: int
    num_classes: int
    wall_s: float
    out_dir: str
    val_top1: float | None = None
    zero_shot_top1: float | None = None
    train_macs: int | None = None  # None for the linear probe (no training step)
    steps: int = 0
    stages: list[dict[str, Any]] | None = None
    probe: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @classmethod
    def of(cls, cfg: FinetuneConfig, source: dict[str, Any], **values: Any) -> FinetuneResult:
        """The result of run ``cfg`` of the CLIP ``source`` (``load_clip``'s info), measured ``values``."""
        return cls(
            label=cfg.label, mode=cfg.mode, progressive=cfg.progressive, member=source.get("member"),
            checkpoint=str(source.get("source", cfg.checkpoint)), set=set_name(cfg.train_dir),
            train_dir=cfg.train_dir, test_dir=cfg.test_dir, seed=cfg.seed, out_dir=str(cfg.out_dir),
            config=to_dict(cfg), **values,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "finetune", **asdict(self)}


def write_result(out_dir: str | Path, result: FinetuneResult) -> Path:
    """Write ``out_dir/result.json`` atomically (a crash leaves no half file that reads as finished)."""
    path = Path(out_dir) / RESULT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{RESULT_NAME}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_result(out_dir: str | Path) -> FinetuneResult | None:
    """The finished run's result in ``out_dir``, or ``None`` when it has not finished."""
    path = Path(out_dir) / RESULT_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        doc.pop("kind", None)
        return FinetuneResult(**doc)
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{path} is not a compt finetune result ({e}); delete it and final.pt next to it to rerun"
        ) from e
