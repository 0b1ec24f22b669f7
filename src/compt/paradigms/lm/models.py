"""Llama-style decoder members for the language-model paradigm (issue 14, item 1).

A member is a Hugging Face ``transformers.LlamaForCausalLM``: RMSNorm, rotary position embeddings
(RoPE), a SwiGLU MLP, grouped-query attention (GQA) and optionally tied input/output embeddings.
compt does not reimplement the model, so an exported member is a plain HF checkpoint
(:mod:`compt.paradigms.lm.export`).

A member's ``model_cfg`` is a dict of ``LlamaConfig`` keyword arguments, the subset in
:data:`MODEL_CFG_KEYS` -- the same role open_clip's config dicts play for CLIP members, stored as is in
a compt checkpoint. :func:`llama_cfg` writes one from compt's size vocabulary (``width``, ``layers``,
``heads``, ...). Families are functions returning ``[(name, model_cfg), ...]`` smallest first:

- :func:`cpu_family`: three members that train on 2 CPU cores in minutes (tests and the demo), about
  4x training MACs per step from one to the next (measured by :func:`sample_macs`).
- :func:`published_family`: Llama-style 125M / 350M / 760M / 1.3B (widths and depths of GPT-3's
  Table 2.1, Brown et al. 2020) for ``compt plan``.

Growth keeps ``head_dim`` and the GQA group size (query heads per key/value head) fixed from member to
member and grows the number of heads (:mod:`compt.paradigms.lm.layout` says why), so both families do.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from compt.config import ConfigError

if TYPE_CHECKING:  # imported where a model is built: listing families must not import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "MODEL_CFG_KEYS",
    "llama_cfg",
    "check_model_cfg",
    "hf_config",
    "build_model",
    "cpu_family",
    "published_family",
    "sample_macs",
]

# key -> (type, what it is). Only what a Llama-style member varies; the rest is LlamaConfig's default
# (silu, no biases, no dropout).
MODEL_CFG_KEYS: dict[str, tuple[type, str]] = {
    "vocab_size": (int, "tokens in the vocabulary (the tokenizer's size)"),
    "hidden_size": (int, "residual width d"),
    "intermediate_size": (int, "SwiGLU hidden units per layer"),
    "num_hidden_layers": (int, "decoder layers"),
    "num_attention_heads": (int, "query heads per layer"),
    "num_key_value_heads": (int, "key/value heads per layer (GQA; = query heads for plain MHA)"),
    "head_dim": (int, "entries per head (even: RoPE rotates pairs i, i + head_dim/2)"),
    "max_position_embeddings": (int, "longest sequence in tokens"),
    "tie_word_embeddings": (bool, "lm_head shares the input embedding matrix"),
    "rope_theta": (float, "RoPE base frequency"),
    "rms_norm_eps": (float, "RMSNorm epsilon"),
    "initializer_range": (float, "std of the normal init of linear and embedding weights"),
}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def llama_cfg(
    *,
    width: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    mlp: int | None = None,
    vocab_size: int,
    context_length: int,
    tied: bool,
    multiple_of: int = 256,
) -> dict[str, Any]:
    """A member's ``model_cfg`` from compt's size vocabulary.

    ``mlp`` defaults to Llama's SwiGLU size: 2/3 of 4 x width, rounded up to ``multiple_of``
    (Touvron et al. 2023, §2.2; the reference code's ``multiple_of``), which keeps the MLP's MACs at
    those of a 4x GELU MLP.
    """
    if mlp is None:
        mlp = multiple_of * math.ceil(8 * width / 3 / multiple_of)
    return {
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": context_length,
        "tie_word_embeddings": tied,
    }


def check_model_cfg(cfg: Mapping[str, Any], where: str = "model_cfg") -> None:
    """Raise :class:`ConfigError` naming every bad key or value of a Llama member's ``model_cfg``."""
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a mapping of LlamaConfig fields, got {type(cfg).__name__}")
    known = sorted(MODEL_CFG_KEYS)
    for key in cfg:
        if key not in MODEL_CFG_KEYS:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(known)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (see compt.paradigms.lm.models.llama_cfg)")
    for key, value in cfg.items():
        tp, what = MODEL_CFG_KEYS[key]
        ok = isinstance(value, bool) if tp is bool else _is_number(value, tp) and value > 0
        if not ok:
            kind = "true or false" if tp is bool else f"a positive {tp.__name__}"
            raise ConfigError(f"{where}: {key} ({what}) must be {kind}, got {value!r}")
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    if heads % kv:
        raise ConfigError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; "
            "GQA gives every key/value head the same number of query heads"
        )
    if cfg["hidden_size"] % heads:
        raise ConfigError(
            f"{where}: hidden_size {cfg['hidden_size']} is not a multiple of num_attention_heads {heads} "
            "(transformers' LlamaConfig requires it)"
        )
    if hd % 2:
        raise ConfigError(f"{where}: head_dim {hd} is odd; RoPE rotates pairs (i, i + head_dim/2)")


def _is_number(value: Any, tp: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if tp is int else isinstance(value, (int, float)) and math.isfinite(value)


def hf_config(cfg: Mapping[str, Any]) -> LlamaConfig:
    """The ``transformers.LlamaConfig`` of a validated ``model_cfg`` (no KV cache: members train)."""
    from transformers import LlamaConfig

    check_model_cfg(cfg)
    kwargs = dict(cfg)
    # transformers 5 keeps RoPE settings in one dict (research/lm-paradigm.md)
    rope = {"rope_type": "default", "rope_theta": float(kwargs.pop("rope_theta", 10000.0))}
    return LlamaConfig(**kwargs, rope_parameters=rope, use_cache=False, attn_implementation="sdpa")


def build_model(cfg: Mapping[str, Any], device: torch.device | str | None = None) -> LlamaForCausalLM:
    """A freshly initialized member (``device='meta'``: shapes only, no memory), from torch's RNG."""
    from transformers import LlamaForCausalLM

    config = hf_config(cfg)
    with torch.device(device if device is not None else "cpu"):
        return LlamaForCausalLM(config)


# --- families ------------------------------------------------------------------------------------

CPU_VOCAB = 4096  # the byte-level BPE of compt.paradigms.lm.tokenizer trained on the stdlib corpus
CPU_CONTEXT = 128


def cpu_family(vocab_size: int = CPU_VOCAB, context_length: int = CPU_CONTEXT) -> list[tuple[str, dict]]:
    """Three tied-embedding members for 2 CPU cores: widths 64 / 128 / 256, head_dim 16, 2 query heads
    per key/value head; about 4x training MACs per step from one to the next at 128 tokens with a
    4,096-token vocabulary (the lm_head is most of the smallest member's cost)."""
    sizes = (("S", 64, 2), ("M", 128, 4), ("L", 256, 6))
    return [
        (
            f"llama-cpu-{tag}",
            llama_cfg(
                width=width,
                layers=layers,
                heads=width // 16,
                kv_heads=width // 32,
                head_dim=16,
                mlp=16 * math.ceil(8 * width / 3 / 16),
                vocab_size=vocab_size,
                context_length=context_length,
                tied=True,
            ),
        )
        for tag, width, layers in sizes
    ]


def published_family(vocab_size: int = 32000, context_length: int = 2048) -> list[tuple[str, dict]]:
    """Llama-style 125M / 350M / 760M / 1.3B for ``compt plan``: GPT-3's widths and depths (Table 2.1),
    Llama's SwiGLU MLP, untied embeddings and 32,000-token vocabulary. Attention is plain multi-head
    (Llama 1 and 2 use GQA only from 34B up), and head_dim is 64 throughout (as in OPT-125m/350m/1.3b),
    so 760M has 24 heads where GPT-3 has 16 of 96."""
    sizes = (("125M", 768, 12), ("350M", 1024, 24), ("760M", 1536, 24), ("1.3B", 2048, 24))
    return [
        (
            f"llama-{tag}",
            llama_cfg(
                width=width,
                layers=layers,
                heads=width // 64,
                kv_heads=width // 64,
                head_dim=64,
                vocab_size=vocab_size,
                context_length=context_length,
                tied=False,
            ),
        )
        for tag, width, layers in sizes
    ]


# --- cost ----------------------------------------------------------------------------------------


def sample_macs(cfg: Mapping[str, Any], seq_len: int) -> dict[str, int]:
    """Per-sample MACs of one member (App. C.2's accounting), a sample being ``seq_len`` tokens.

    ``forward_macs`` is measured by ``compt.cost.count_macs`` on the meta device: every projection,
    the lm_head over all positions, and causal attention counted as the full ``S x S`` score and value
    products (what the dense kernels compute; tests/test_lm_cost.py explains the convention).
    ``train_macs = 3 x forward`` (Eq. 6 with a first layer of 0 MACs: the token lookup), and
    ``update_macs`` is AdamW's 3 x parameters per optimizer step. ``params`` counts a tied matrix once.
    """
    check_model_cfg(cfg)
    if seq_len > cfg["max_position_embeddings"]:
        raise ConfigError(
            f"seq_len {seq_len} exceeds the member's max_position_embeddings {cfg['max_position_embeddings']}"
        )
    return dict(_sample_macs(tuple(sorted(cfg.items())), seq_len))


@lru_cache(maxsize=64)
def _sample_macs(items: tuple, seq_len: int) -> tuple[tuple[str, int], ...]:
    from compt.cost import count_macs  # cost is generic; the LM paradigm only feeds it a sample

    model = build_model(dict(items), device="meta").eval()
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device="meta")
    with torch.no_grad():
        # use_cache=True skips transformers' packed-sequence check, a data-dependent branch the meta
        # device cannot take; the matmuls counted are the same as in training.
        forward = count_macs(lambda: model(input_ids=tokens, use_cache=True))
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied matrix once
    embed = model.get_input_embeddings().weight.numel()
    return (
        ("params", params),
        ("params_no_embed", params - embed),
        ("forward_macs", forward),
        ("train_macs", 3 * forward),
        ("update_macs", 3 * params),
    )
