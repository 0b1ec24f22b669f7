"""compt.cost counts an LM's training MACs as a hand count does (issue 14, item 6).

Convention for causal attention: the **full** ``S x S`` score (``Q K^T``) and value (``P V``) products
are counted, not the lower half the mask keeps. That is what the dense kernels compute (the math
backend ``FlopCounterMode`` sees, and FlashAttention's causal kernel saves only part of it), what the
usual MFU formulas assume (PaLM App. B's ``6N + 12 L H Q T``, nanoGPT's ``estimate_mfu``, torchtitan's
``get_num_flop_per_token``), and what compt already counts for CLIP's causal text tower, so the two
paradigms' MACs are on one scale. Halving it would lower a member's MACs by ``H S^2 hd`` per layer.
GQA shows up as k/v projections of ``Hkv * head_dim`` rows; the lm_head runs over every position.
"""

from __future__ import annotations

import pytest
import torch

from compt.cost import count_macs
from compt.paradigms.lm.models import build_model, llama_cfg, sample_macs

torch.set_num_threads(1)


def _cfg(heads=4, kv_heads=2, tied=True):
    return llama_cfg(
        width=32,
        layers=2,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=8,
        mlp=48,
        vocab_size=50,
        context_length=64,
        tied=tied,
    )


def _hand(cfg, batch: int, seq: int) -> int:
    """Forward MACs of a Llama by hand: every matmul, embedding lookup and norms 0."""
    d, hd, ff, v = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"], cfg["vocab_size"]
    h, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    projections = seq * d * h * hd * 2 + seq * d * k * hd * 2  # q, o  +  k, v (GQA: k heads)
    attention = 2 * h * seq * seq * hd  # Q K^T and P V, the full S x S (module docstring)
    mlp = 3 * seq * d * ff  # gate, up, down
    return batch * (cfg["num_hidden_layers"] * (projections + attention + mlp) + seq * d * v)


@pytest.mark.parametrize(("heads", "kv_heads", "tied"), [(4, 2, True), (4, 4, False), (4, 1, True)])
@pytest.mark.parametrize("seq", [7, 24])
def test_forward_macs_match_the_hand_count(heads, kv_heads, tied, seq):
    cfg = _cfg(heads, kv_heads, tied)
    model = build_model(cfg)
    tokens = torch.randint(0, 50, (3, seq))
    with torch.no_grad():
        assert count_macs(lambda: model(input_ids=tokens)) == _hand(cfg, 3, seq)
    assert sample_macs(cfg, seq)["forward_macs"] == _hand(cfg, 1, seq)  # meta device, one sequence


def test_training_step_is_three_forwards():
    # Eq. 6: backward = 2 x forward - first layer, and the first layer (the token lookup) costs 0
    cfg = _cfg()
    model = build_model(cfg)
    tokens = torch.randint(0, 50, (2, 17))

    def step():
        model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss.backward()

    assert count_macs(step) == 3 * _hand(cfg, 2, 16)
    assert sample_macs(cfg, 16)["train_macs"] == 3 * _hand(cfg, 1, 16)


def test_gqa_saves_exactly_the_smaller_kv_projections():
    mha, gqa = sample_macs(_cfg(4, 4), 16), sample_macs(_cfg(4, 1), 16)
    assert mha["forward_macs"] - gqa["forward_macs"] == 2 * 2 * 16 * 32 * (4 - 1) * 8  # layers * k,v * ...
    assert mha["params"] - gqa["params"] == 2 * 2 * 32 * (4 - 1) * 8


def test_tied_embeddings_count_once_in_params_but_the_head_still_runs():
    tied, untied = sample_macs(_cfg(tied=True), 16), sample_macs(_cfg(tied=False), 16)
    assert untied["params"] - tied["params"] == 50 * 32
    assert tied["forward_macs"] == untied["forward_macs"]
    assert tied["update_macs"] == 3 * tied["params"]
