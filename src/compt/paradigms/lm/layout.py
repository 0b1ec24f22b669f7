"""Which axis of a Llama state dict is which width: the grow layout of the LM paradigm (issue 14, item 2).

Inverse weight initialization (paper §3.1.1, App. D.1) grows a trained small member into the next. The
rules here speak :mod:`compt.grow.layout`'s vocabulary (:class:`~compt.grow.layout.Space`,
:class:`~compt.grow.layout.Axis`, :class:`~compt.grow.layout.Rule`), so every width strategy of
:mod:`compt.grow.strategies` (insert, duplicate, interpolate, net2net, paper-compat, none) and every
depth strategy applies to a ``transformers.LlamaForCausalLM`` unchanged. What is particular to Llama:

- **Heads grow, head_dim does not.** HF's ``rotate_half`` pairs entry ``i`` of a head with
  ``i + head_dim/2`` and RoPE's frequencies depend on ``head_dim``; growing it would move entries onto
  other frequencies. Teacher and student must have the same ``head_dim``.
- **GQA as nested groups.** Query head ``j`` reads key/value head ``j // G`` (``G`` query heads per
  kv head). A layer's attention width is one :class:`Space` whose units are the kv heads: ``k_proj`` /
  ``v_proj`` rows have ``head_dim`` entries per unit, ``q_proj`` rows (and ``o_proj`` columns) the
  ``G x head_dim`` entries of the unit's query heads. One units map then moves a kv head together
  with its query heads, whatever the strategy (Net2Net's random copies included). The within-unit map
  is the identity, so ``G`` must be the same in teacher and student; growing ``G`` as well would need
  a third level (kv head, query head, entry) that ``compt.grow.strategies.axis_map`` does not have.
- **MLP by hidden units** (gate_proj / up_proj rows, down_proj columns: SwiGLU multiplies unit by unit),
  **RMSNorm weights** on the residual width, which is ``normed`` (Net2Net copies it round-robin).
- **Tied embeddings are grown once.** A tied student's ``lm_head.weight`` gets the embedding's own rule
  (same source, same axes), so both keys come out as the same tensor values and load into the one
  shared parameter (the tie is kept, nothing to re-tie); a tied teacher's head is always read from
  ``model.embed_tokens.weight`` (a ``save_pretrained`` checkpoint drops ``lm_head``).

``describe`` reads a member's sizes from its ``model_cfg`` and checks its state dict against them,
``check_growable`` names every reason a pair cannot grow, ``plan`` gives the rules and the depth map,
``net2net_notes`` says where Net2Net widening is not exactly function-preserving. :data:`LAYOUT` (an
:class:`LMLayout`) is the paradigm's :class:`~compt.grow.layout.GrowLayout`, so that
:func:`compt.grow.grow` and ``compt.grow.grow_state_dict(..., paradigm="lm")`` apply them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from compt.config import ConfigError
from compt.grow.layout import FIXED, Axis, GrowError, GrowPlan, Rule, Space
from compt.paradigms.lm.models import MODEL_CFG_KEYS, check_model_cfg

__all__ = ["STACK", "LlamaSpec", "describe", "check_growable", "plan", "net2net_notes", "LMLayout", "LAYOUT"]

STACK = "decoder"  # the depth map's name, as "visual" / "text" are CLIP's
_PREFIX = "model.layers"
_EMBED = "model.embed_tokens.weight"
_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class LlamaSpec:
    """The sizes of one Llama member as far as growing needs them."""

    width: int  # hidden_size
    layers: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    mlp: int  # intermediate_size
    vocab_size: int
    tied: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA's G)."""
        return self.heads // self.kv_heads


def describe(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], who: str) -> LlamaSpec:
    """The sizes of ``cfg`` (a member's ``model_cfg``), after checking ``sd``'s shapes agree with them."""
    try:
        check_model_cfg(cfg, where=f"the {who}'s model_cfg")
    except ConfigError as e:
        raise GrowError(str(e)) from None
    spec = LlamaSpec(
        width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=cfg["num_attention_heads"],
        kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg["head_dim"],
        mlp=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),  # LlamaConfig's default
    )
    pat = re.compile(re.escape(_PREFIX) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in sd if (m := pat.match(k))}
    if found != set(range(spec.layers)):
        raise GrowError(
            f"the {who} state dict has decoder layers {sorted(found)} but its model_cfg says "
            f"num_hidden_layers={spec.layers}; pass the config the checkpoint was trained with"
        )
    d, hd = spec.width, spec.head_dim
    expected = {
        _EMBED: (spec.vocab_size, d),
        f"{_PREFIX}.0.self_attn.q_proj.weight": (spec.heads * hd, d),
        f"{_PREFIX}.0.self_attn.k_proj.weight": (spec.kv_heads * hd, d),
        f"{_PREFIX}.0.mlp.gate_proj.weight": (spec.mlp, d),
    }
    for key, shape in expected.items():
        if key not in sd:
            raise GrowError(
                f"the {who} state dict has no tensor {key!r}; the LM layout grows "
                "transformers.LlamaForCausalLM state dicts"
            )
        if tuple(sd[key].shape) != shape:
            raise GrowError(
                f"the {who}'s {key} is {tuple(sd[key].shape)} but its model_cfg gives {shape}; "
                "pass the config the checkpoint was trained with"
            )
    return spec


def check_growable(t: LlamaSpec, s: LlamaSpec) -> None:
    """Raise :class:`GrowError` naming every size that stops ``t`` from growing into ``s``."""
    if t.vocab_size != s.vocab_size:
        raise GrowError(
            f"vocabulary sizes differ: teacher {t.vocab_size}, student {s.vocab_size} "
            "(model.embed_tokens rows); grow between members with the same tokenizer"
        )
    if t.head_dim != s.head_dim:
        raise GrowError(
            f"head_dim differs: teacher {t.head_dim}, student {s.head_dim}; RoPE pairs entry i with "
            "i + head_dim/2 at frequencies set by head_dim, so members grow by heads with head_dim fixed"
        )
    if t.group != s.group:
        raise GrowError(
            f"GQA group sizes differ: the teacher has {t.group} query heads per key/value head "
            f"({t.heads}/{t.kv_heads}), the student {s.group} ({s.heads}/{s.kv_heads}); growth adds "
            "key/value heads, each with its query heads, so keep num_attention_heads / "
            "num_key_value_heads the same along the family"
        )
    if s.tied and not t.tied:
        raise GrowError(
            "the student ties lm_head to its input embedding but the teacher has separate ones; one "
            "shared matrix cannot inherit both: untie the student (tie_word_embeddings: false)"
        )
    small = [
        f"{what} {getattr(s, what)} < {getattr(t, what)}"
        for what in ("width", "layers", "heads", "kv_heads", "mlp")
        if getattr(s, what) < getattr(t, what)
    ]
    if small:
        raise GrowError(
            "the student is smaller than its teacher: "
            + "; ".join(small)
            + ". A chain grows from small to large: pass the smaller model as the teacher"
        )


def _layer_axes(t: LlamaSpec, s: LlamaSpec, layer: int, r: Space) -> dict[str, tuple[Axis, ...]]:
    """Axes of every tensor of student decoder layer ``layer``."""
    key = f"{STACK}.{layer}.kv_heads"
    # One units map for k/v (head_dim per kv head) and q/o (its G query heads): module docstring.
    kv = Space(key, t.kv_heads, s.kv_heads, t.head_dim, s.head_dim)
    q = Space(key, t.kv_heads, s.kv_heads, t.group * t.head_dim, s.group * s.head_dim)
    m = Space(f"{STACK}.{layer}.mlp", t.mlp, s.mlp)
    r_out, r_in = Axis(r), Axis(r, "in")
    return {
        "input_layernorm.weight": (r_out,),
        "post_attention_layernorm.weight": (r_out,),
        "self_attn.q_proj.weight": (Axis(q), r_in),
        "self_attn.k_proj.weight": (Axis(kv), r_in),
        "self_attn.v_proj.weight": (Axis(kv), r_in),
        "self_attn.o_proj.weight": (r_out, Axis(q, "in")),
        "mlp.gate_proj.weight": (Axis(m), r_in),
        "mlp.up_proj.weight": (Axis(m), r_in),
        "mlp.down_proj.weight": (r_out, Axis(m, "in")),
    }


DepthFn = Callable[[int, int], list]


def plan(t: LlamaSpec, s: LlamaSpec, depth: DepthFn) -> tuple[dict[str, Rule], dict[str, list[int | None]]]:
    """Rules for every tensor of the student's state dict, and the depth map ``{"decoder": [...]}``
    (student layer -> teacher layer or ``None``)."""
    r = Space(f"{STACK}.width", t.width, s.width, normed=True)  # every RMSNorm runs over it
    embed = (FIXED, Axis(r))
    rules = {_EMBED: Rule(_EMBED, embed), "model.norm.weight": Rule("model.norm.weight", (Axis(r),))}
    head_source = _EMBED if t.tied else _HEAD
    # A tied student's head is its embedding: the same rule, so both keys get the same values.
    rules[_HEAD] = Rule(_EMBED, embed) if s.tied else Rule(head_source, (FIXED, Axis(r, "in")))
    layer_of = depth(t.layers, s.layers)
    for layer, src in enumerate(layer_of):
        for suffix, axes in _layer_axes(t, s, layer, r).items():
            source = None if src is None else f"{_PREFIX}.{src}.{suffix}"
            rules[f"{_PREFIX}.{layer}.{suffix}"] = Rule(source, axes)
    return rules, {STACK: list(layer_of)}


def net2net_notes(t: LlamaSpec, s: LlamaSpec) -> list[str]:
    """Where Net2Net widening of ``t`` into ``s`` is not exactly function-preserving (empty: it is)."""
    notes = []
    if s.width % t.width:
        notes.append(
            f"net2net: width {t.width} -> {s.width} is not an integer ratio, so the RMSNorms see uneven "
            "copies; the function changes slightly"
        )
    if s.layers != t.layers:
        notes.append(
            f"net2net: depth {t.layers} -> {s.layers}: the added layers are not identities, so the "
            "function changes"
        )
    if s.tied and s.width != t.width:
        notes.append(
            "net2net: tied embeddings: the shared matrix copies its residual columns for the input but "
            "would need them split for the lm_head, so the logits scale by the width ratio"
        )
    return notes


# --- the LM paradigm's GrowLayout ----------------------------------------------------------------


class LMLayout:
    """The :class:`~compt.grow.layout.GrowLayout` of ``LlamaForCausalLM`` members.

    The hints are the member's ``model_cfg`` itself: head counts, head_dim and the tie are not in a
    state dict's shapes. Llama has no learned positions, so ``interpolate_pos`` has nothing to do.
    """

    def hints_from_cfg(self, cfg: Mapping[str, Any], who: str) -> dict[str, Any]:
        try:
            check_model_cfg(cfg, where=f"the {who}'s model_cfg")
        except ConfigError as e:
            raise GrowError(str(e)) from None
        return dict(cfg)

    def hints_from_model(self, model: torch.nn.Module, who: str) -> dict[str, Any]:
        from transformers import LlamaForCausalLM

        if not isinstance(model, LlamaForCausalLM):
            raise GrowError(f"the {who} is a {type(model).__name__}; the LM layout grows LlamaForCausalLM")
        config = model.config
        # rope_theta lives in rope_parameters in transformers 5 and does not change any shape.
        return {k: getattr(config, k) for k in MODEL_CFG_KEYS if k != "rope_theta" and hasattr(config, k)}

    def plan(
        self,
        teacher_sd: Mapping[str, torch.Tensor],
        teacher_hints: Mapping[str, Any],
        student_sd: Mapping[str, torch.Tensor],
        student_hints: Mapping[str, Any],
        *,
        depth: DepthFn,
        width: str,
        interpolate_pos: bool,
    ) -> GrowPlan:
        t = describe(teacher_sd, teacher_hints, "teacher")
        s = describe(student_sd, student_hints, "student")
        check_growable(t, s)
        rules, depth_maps = plan(t, s, depth)
        notes = net2net_notes(t, s) if width == "net2net" else []
        return GrowPlan(rules=rules, depth_maps=depth_maps, teacher_sd=teacher_sd, notes=notes)


LAYOUT = LMLayout()
