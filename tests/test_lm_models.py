"""Llama members (compt.paradigms.lm.models): config validation, families, real builds."""

from __future__ import annotations

import pytest
import torch

from compt.config import ConfigError
from compt.paradigms.lm.models import (
    build_model,
    check_model_cfg,
    cpu_family,
    llama_cfg,
    published_family,
    sample_macs,
)

torch.set_num_threads(1)

FAMILIES = {"cpu": (cpu_family, 128), "published": (published_family, 2048)}


def _tiny(**over):
    cfg = llama_cfg(
        width=32,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=8,
        mlp=48,
        vocab_size=64,
        context_length=16,
        tied=True,
    )
    return {**cfg, **over}


def test_llama_cfg_builds_the_architecture_it_names():
    model = build_model(_tiny())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2
    assert attn.q_proj.weight.shape == (32, 32) and attn.k_proj.weight.shape == (16, 32)  # GQA: 2 kv heads
    assert mlp.gate_proj.weight.shape == (48, 32) and type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.head_dim == 8 and model.config.rope_parameters["rope_theta"] == 10000.0
    untied = build_model(_tiny(tie_word_embeddings=False, rope_theta=500000.0))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert untied.config.rope_parameters["rope_theta"] == 500000.0


def test_llama_cfg_default_mlp_is_llamas_swiglu_size():
    # 2/3 of 4 x 4096 rounded up to 256 is Llama-7B's 11008
    cfg = llama_cfg(
        width=4096, layers=1, heads=32, kv_heads=32, head_dim=128, vocab_size=8, context_length=8, tied=False
    )
    assert cfg["intermediate_size"] == 11008


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hiden_size": 32}, "did you mean 'hidden_size'"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
        ({"head_dim": 7}, "head_dim 7 is odd"),
        ({"num_hidden_layers": 0}, "num_hidden_layers .* must be a positive int"),
        ({"vocab_size": 64.0}, "vocab_size .* must be a positive int"),
        ({"tie_word_embeddings": 1}, "must be true or false"),
        ({"num_attention_heads": 6, "num_key_value_heads": 3}, "hidden_size 32 is not a multiple"),
    ],
)
def test_bad_model_cfg_names_the_key(change, message):
    with pytest.raises(ConfigError, match=message):
        check_model_cfg(_tiny(**change), where="member x")


def test_missing_keys_are_listed():
    cfg = _tiny()
    del cfg["head_dim"], cfg["vocab_size"]
    with pytest.raises(ConfigError, match="missing vocab_size, head_dim"):
        build_model(cfg)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_members_are_valid_ascending_and_growable(family):
    make, seq_len = FAMILIES[family]
    members = make()
    assert len(members) in (3, 4) and len({n for n, _ in members}) == len(members)
    costs = [sample_macs(cfg, seq_len) for _, cfg in members]
    for (_, a), (_, b), ca, cb in zip(members, members[1:], costs, costs[1:], strict=False):
        assert cb["params"] > ca["params"] and cb["train_macs"] > ca["train_macs"]
        # growth keeps head_dim, the GQA group, the vocabulary (compt.paradigms.lm.layout)
        for key in ("head_dim", "vocab_size", "tie_word_embeddings"):
            assert a[key] == b[key], key
        assert (
            a["num_attention_heads"] // a["num_key_value_heads"]
            == b["num_attention_heads"] // b["num_key_value_heads"]
        )


def test_cpu_family_steps_are_about_4x_training_macs_apart():
    costs = [sample_macs(cfg, 128)["train_macs"] for _, cfg in cpu_family()]
    ratios = [b / a for a, b in zip(costs, costs[1:], strict=False)]
    assert all(3 <= r <= 5 for r in ratios), ratios


def test_published_family_sizes_match_their_names():
    params = {name: sample_macs(cfg, 2048)["params"] for name, cfg in published_family()}
    named = {"llama-125M": 125e6, "llama-350M": 350e6, "llama-760M": 760e6, "llama-1.3B": 1.3e9}
    for name, n in named.items():
        assert abs(params[name] / n - 1) < 0.1, (name, params[name])


def test_sample_macs_rejects_a_sequence_longer_than_the_member():
    with pytest.raises(ConfigError, match="exceeds the member's max_position_embeddings 16"):
        sample_macs(_tiny(), 17)
