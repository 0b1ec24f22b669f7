"""MSG's growth masks (issue 13; Yao et al. 2024, cofe-ai/MSG): a grown student that computes its
teacher's function whatever its new weights are, until a ramp hands the new units over to training.

A width strategy registered with ``masked=True`` (``msg``) leaves the new units at the student's init
and the trainer multiplies them by a mask m that ramps from 0 to 1 over ``mask_ramp_fraction`` of the
link (:meth:`GrowthMask.at`). Where the masks go follows from the paradigm's layout (which axis of
which tensor is which space, and which role it plays):

- a new unit of a space that is **not normalized** (a layer's heads, its MLP units): its consumers'
  input columns are multiplied by m (attention's output projection, the MLP's second linear layer),
  which is exactly "the unit's output times m", whatever the nonlinearity before it;
- a new entry of a **normalized** space (a tower's residual width, the joint embedding): every tensor
  that writes it (embeddings, residual-branch outputs, LayerNorm weight and bias, the final
  projections) is multiplied by m on that axis, so at m = 0 those entries are exactly 0; every
  LayerNorm over it computes its mean and variance with weights m (MSG's masked LayerNorm), at m = 0
  over the teacher's entries only. CLIP's L2 normalization needs nothing: zeros do not change a norm;
- a **new layer** (depth growth: every student layer but the first copy of its teacher layer) gets a
  scalar m on the tensors that write its residual branches (the layout's ``branch_outputs``), so it
  starts as the identity.

The parameters stay the raw weights (what AdamW updates); the masks are ``torch.nn.utils.parametrize``
parametrizations on them, plus forward hooks on the LayerNorms, so training, evaluation and DDP all
see the masked model. Checkpoints store the raw weights under their plain names
(:func:`plain_state_dict`) and the masks (:meth:`GrowthMask.state_dict`, ``grow_mask``), so a resumed
run masks exactly as before. At m = 1 the masked model is the raw model: the trainer then removes
every parametrization and hook, and ``final.pt`` and the export hold a plain model.

Exact: at m = 0 the student's outputs equal the teacher's (to float rounding) for any growth of
widths, head counts, MLP units, embedding width and depth, with any initial weights, **except** where
the head width changes (the attention scale 1/sqrt(head width) and the new q/k dimensions inside old
heads change the scores; the paper's ViT family keeps 64). A layer scale (``ls_*.gamma``) on a
residual branch is masked twice (m^2 there; exact at both ends of the ramp).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from compt.grow.layout import Rule
from compt.grow.strategies import axis_map, width_strategy

__all__ = ["GrowthMask", "plain_state_dict"]

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with parametrized tensors under their plain names (their raw values)."""
    return {_PARAMETRIZED.sub(r"\1\2", k): v for k, v in model.state_dict().items()}


class _Mask(nn.Module):
    """The parametrization ``W -> W * prod_axes where(new, m, 1) [* m for a new layer's branch]``."""

    def __init__(self, owner: GrowthMask, axes: list[tuple[int, torch.Tensor]], layer: bool):
        super().__init__()
        self.owner, self.dims, self.layer = owner, [d for d, _ in axes], layer
        for i, (_, new) in enumerate(axes):
            self.register_buffer(f"new{i}", new, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        m = self.owner.value.to(weight.dtype)
        for i, d in enumerate(self.dims):
            shape = [1] * weight.dim()
            shape[d] = -1
            weight = weight * torch.where(getattr(self, f"new{i}"), m, 1).view(shape)
        return weight * m if self.layer else weight


def _masked_layer_norm(owner: GrowthMask, new: torch.Tensor):
    """A forward hook: the LayerNorm's statistics weighted by the mask (MSG), in float32."""

    def hook(module: nn.LayerNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        w = torch.where(new, owner.value, 1).float()
        total = w.sum()
        mean = (x * w).sum(-1, keepdim=True) / total
        var = ((x - mean).pow(2) * w).sum(-1, keepdim=True) / total
        y = (x - mean) * torch.rsqrt(var + module.eps)
        return (y * module.weight.float() + module.bias.float()).to(output.dtype)

    return hook


class GrowthMask:
    """The masks of one grown student: which entries of which tensors are new, and the ramp.

    ``axes``: student tensor -> ``[(axis, bool vector of its new entries)]``; ``layers``: student
    tensor -> the new layer whose residual branch it writes; ``ramp_steps``: steps from m = 0 to 1.
    """

    def __init__(
        self,
        axes: Mapping[str, list[tuple[int, torch.Tensor]]],
        layers: Mapping[str, str],
        ramp_steps: int = 1,
    ):
        self.axes = {k: [(int(d), v.bool().cpu()) for d, v in a] for k, a in axes.items()}
        self.layers, self.ramp_steps = dict(layers), max(1, int(ramp_steps))
        self.value = torch.zeros(())  # m, moved to the model's device by install()
        self._installed: list[tuple[nn.Module, str]] = []
        self._hooks: list[Any] = []

    @classmethod
    def plan(
        cls,
        rules: Mapping[str, Rule],
        depth_maps: Mapping[str, list[int | None]],
        branch_outputs: Mapping[str, tuple[str, int]],
    ) -> GrowthMask | None:
        """The masks of a grow plan (``None`` when the student has nothing new to mask).

        New entries are the ones beyond the teacher's units (and dims) of each space, as ``insert``
        places them; see the module docstring for which axes carry a mask.
        """
        insert, cache = width_strategy("insert"), {}
        axes: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for key, rule in rules.items():
            masked = []
            for d, axis in enumerate(rule.axes):
                sp = axis.space
                # Writers of a normalized space, consumers of any other (module docstring).
                if sp is None or (axis.role == "out") != sp.normed:
                    continue
                dims = (sp.dims_t, sp.dims_s) if axis.with_dims else (1, 1)
                n_t, n_s = axis.groups * sp.units_t * dims[0], axis.groups * sp.units_s * dims[1]
                m = axis_map(axis, n_t, n_s, insert, 0, cache, key)
                if m is not None and not bool(m.inherited.all()):
                    masked.append((d, ~m.inherited))
            if masked:
                axes[key] = masked
        new_layers = {
            f"{stack}.{layer}"
            for stack, sources in depth_maps.items()
            for layer, src in enumerate(sources)
            if src is None or src in sources[:layer]  # fresh, or a second copy of its teacher layer
        }
        layers = {k: f"{s}.{i}" for k, (s, i) in branch_outputs.items() if f"{s}.{i}" in new_layers}
        return cls(axes, layers) if axes or layers else None

    # --- the ramp ----------------------------------------------------------------------------------

    def at(self, step: int) -> bool:
        """Set m for the update after ``step`` steps (m = step / ramp_steps, at most 1); True once m = 1."""
        m = min(1.0, step / self.ramp_steps)
        self.value.fill_(m)  # in place on the device: no host sync
        return m >= 1.0

    # --- the model ---------------------------------------------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Parametrize the masked tensors of ``model`` and hook its masked LayerNorms (after the
        optimizer is built: the parameters stay the same objects, under new names)."""
        if self._installed:
            raise RuntimeError("growth masks are already installed")
        modules = dict(model.named_modules())
        self.value = self.value.to(next(model.parameters()).device)
        for key in sorted(set(self.axes) | set(self.layers)):
            owner, _, name = key.rpartition(".")
            if owner not in modules or not hasattr(modules[owner], name):
                raise ValueError(f"growth mask for {key!r}, but the model has no such tensor")
            mask = _Mask(self, self.axes.get(key, []), key in self.layers).to(self.value.device)
            parametrize.register_parametrization(modules[owner], name, mask)
            self._installed.append((modules[owner], name))
        for name, module in modules.items():
            key = f"{name}.weight" if name else "weight"
            if isinstance(module, nn.LayerNorm) and key in self.axes:
                new = self.axes[key][0][1].to(self.value.device)
                self._hooks.append(module.register_forward_hook(_masked_layer_norm(self, new)))

    def remove(self, fold: bool = False) -> None:
        """Remove every parametrization and hook. ``fold=False`` (m = 1) keeps the raw weights, which
        are then the model's function; ``fold=True`` (a run stopped mid-ramp) writes the masked
        weights into them, which is exact except for the LayerNorm statistics."""
        for module, name in self._installed:
            parametrize.remove_parametrizations(module, name, leave_parametrized=fold)
        for hook in self._hooks:
            hook.remove()
        self._installed, self._hooks = [], []

    # --- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"axes": self.axes, "layers": self.layers, "ramp_steps": self.ramp_steps}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> GrowthMask:
        return cls(state["axes"], state["layers"], state["ramp_steps"])
