"""Optimizer and learning-rate schedule of the paper's protocol (App. B.1, Table C).

- AdamW, betas (0.9, 0.98), weight decay 0.1, applied to weight matrices only: norms, biases,
  embeddings (token, positional, class) and the logit scale are not decayed (as OpenCLIP does).
- eps per model kind is the paradigm's default (:meth:`compt.paradigms.Paradigm.default_eps`).
- A cosine decay with linear warmup, stepped per optimizer step (not per epoch): 8000 warmup steps
  for a baseline member and 1000 for a chain link in the paper. ``decay_fraction < 1`` ends the
  cosine early (LEMON, ICLR 2024: keep the peak lr, decay faster), then holds ``min_lr``.
- Optimizer hand-over (issue 13): :func:`moments_by_name` is what ``final.pt`` keeps with
  ``keep_moments``; :func:`load_moments` puts grown moments (:func:`compt.grow.grow_moments`) into a
  fresh AdamW (staged training, Shen et al. 2022).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "PAPER_WARMUP_STEPS",
    "fused_adamw",
    "param_groups",
    "build_optimizer",
    "CosineSchedule",
    "moments_by_name",
    "load_moments",
]

# Table C: warmup iterations of a baseline (individually trained) member and of a chain link.
PAPER_WARMUP_STEPS = {"baseline": 8000, "link": 1000}

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def fused_adamw(device: torch.device) -> bool:
    """Whether AdamW runs as torch's fused kernel on ``device``: exactly on CUDA (issue 17).

    The fused kernel updates every parameter in one launch and takes the fp16 grad scaler's
    inf check on the device, so ``GradScaler.step`` needs no host sync; it agrees with the
    default (foreach) update to float rounding. On CPU the default is kept.
    """
    return device.type == "cuda"


def _no_decay_names(module: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: norms, biases, embeddings, scalars (logit scale)."""
    names = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if (
                isinstance(mod, (*_NORM_TYPES, nn.Embedding))
                or p.ndim < 2
                or "embedding" in p_name  # positional_embedding, class_embedding (plain parameters)
                or "logit_scale" in p_name
                or p_name.endswith("bias")
            ):
                names.add(full)
        # timm towers (e.g. Swin) list their own exemptions (relative position tables, tokens).
        exempt = getattr(mod, "no_weight_decay", None)
        if callable(exempt):
            prefix = f"{mod_name}." if mod_name else ""
            names.update(prefix + n for n in exempt())
    return names


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters of ``modules``: decayed and not decayed."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        skip = _no_decay_names(module)
        for name, p in module.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if name in skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    modules: Iterable[nn.Module],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    device: torch.device,
) -> torch.optim.AdamW:
    """AdamW over ``modules`` (the student and the IFD projection; never the teacher)."""
    groups = param_groups(modules, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused_adamw(device) or None)


@dataclass
class CosineSchedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``.

    ``lr_at(step)`` is a pure function of the optimizer step, so resuming needs only the step; the
    schedule is stored in checkpoints for the record and checked on resume.
    """

    lr: float
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float = 0.0
    decay_fraction: float = 1.0  # the cosine reaches the floor after this fraction of the post-warmup steps

    def lr_at(self, step: int) -> float:
        """Learning rate for the update that follows ``step`` completed steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, round((self.total_steps - self.warmup_steps) * self.decay_fraction))
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for the update after ``step`` steps; returns it."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cosine", **asdict(self)}


def moments_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict[str, Any]]:
    """AdamW's ``exp_avg``, ``exp_avg_sq`` and ``step`` of every parameter of ``model``, by name (CPU)."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if state and "exp_avg" in state:
            out[name] = {
                "exp_avg": state["exp_avg"].detach().cpu(),
                "exp_avg_sq": state["exp_avg_sq"].detach().cpu(),
                "step": int(state["step"]),
            }
    return out


def load_moments(
    optimizer: torch.optim.Optimizer, model: nn.Module, moments: dict[str, dict[str, Any]]
) -> None:
    """Set AdamW's state of ``model``'s parameters from ``moments`` (as :func:`moments_by_name` gives).

    ``step`` is kept too, so bias correction treats the moments as the averages they are. The step
    counter lives where torch's AdamW puts it: on the parameter's device for the fused and capturable
    kernels, else a CPU scalar.
    """
    params = dict(model.named_parameters())
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for name, held in moments.items():
        p = params[name]
        group = group_of[id(p)]
        on_device = bool(group.get("fused") or group.get("capturable"))
        optimizer.state[p] = {
            "step": torch.tensor(float(held["step"]), dtype=scalar, device=p.device if on_device else "cpu"),
            "exp_avg": held["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
            "exp_avg_sq": held["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
        }
