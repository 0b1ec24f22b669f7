"""The LM paradigm's members and families: each member a ``transformers.LlamaForCausalLM`` (issue 14, item 1).

A member's ``model_cfg`` is a dict of ``LlamaConfig`` fields (:mod:`compt.paradigms.lm.models`), so a
family YAML file with ``paradigm: lm`` lists them per member::

    name: my-llamas
    paradigm: lm
    members:
      - {name: my-S, vocab_size: 4096, hidden_size: 64, intermediate_size: 176, num_hidden_layers: 2,
         num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, max_position_embeddings: 128,
         tie_word_embeddings: true}

Registered here: ``llama-cpu`` (``llama-cpu-S/M/L``, trains on 2 CPU cores in minutes: tests, the
demo and the measurements of docs/lm.md) and ``llama`` (``llama-125M`` ... ``llama-1.3B``, published
sizes for ``compt plan``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from compt.families import Member, register_family
from compt.paradigms.lm.models import check_model_cfg, cpu_family, published_family

__all__ = ["LMMember", "validate_model_cfg"]


@dataclass(frozen=True)
class LMMember(Member):
    """A Llama-style member: its ``LlamaConfig`` fields and the sizes a batch of windows depends on."""

    paradigm_name: ClassVar[str] = "lm"

    @property
    def context_length(self) -> int:
        """The longest window the member reads (RoPE positions), in tokens."""
        return int(self.model_cfg["max_position_embeddings"])

    @property
    def vocab_size(self) -> int:
        return int(self.model_cfg["vocab_size"])

    @property
    def width(self) -> int:
        """The residual width d (what feature distillation compares)."""
        return int(self.model_cfg["hidden_size"])


def validate_model_cfg(cfg: Any, where: str) -> None:
    """Raise a ``ValueError`` naming ``where`` and the field when ``cfg`` is not a Llama member config."""
    check_model_cfg(cfg, where)


@register_family(
    "llama-cpu",
    "Three tied GQA Llamas for 2 CPU cores (widths 64/128/256, head_dim 16, BPE 4096, 128 tokens).",
)
def _llama_cpu() -> list[LMMember]:
    return [LMMember(name=n, family="llama-cpu", model_cfg=cfg) for n, cfg in cpu_family()]


@register_family(
    "llama",
    "Llama-style 125M / 350M / 760M / 1.3B (GPT-3 widths and depths, 32k vocabulary, 2048 tokens).",
)
def _llama() -> list[LMMember]:
    return [LMMember(name=n, family="llama", model_cfg=cfg) for n, cfg in published_family()]
