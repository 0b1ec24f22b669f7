"""The Llama grow layout (compt.paradigms.lm.layout) through compt.grow's public API (``paradigm="lm"``)."""

from __future__ import annotations

import pytest
import torch

from compt.grow import GrowError, grow, grow_state_dict, list_depth_strategies, list_width_strategies
from compt.paradigms.lm.layout import describe, net2net_notes
from compt.paradigms.lm.models import build_model, llama_cfg

torch.set_num_threads(1)
T_SEQ = 12


def _cfg(width=32, layers=2, heads=4, kv_heads=2, head_dim=8, mlp=48, tied=True, vocab=97):
    return llama_cfg(
        width=width,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        mlp=mlp,
        vocab_size=vocab,
        context_length=32,
        tied=tied,
    )


def _model(cfg, seed):
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _grow(teacher, t_cfg, student, s_cfg, width="insert", depth="duplicate", seed=0):
    """compt.grow.grow_state_dict with the LM layout; loads the result into ``student``."""
    s_sd = student.state_dict()
    out, report = grow_state_dict(
        teacher.state_dict(), t_cfg, s_sd, s_cfg, width=width, depth=depth, seed=seed, paradigm="lm"
    )
    assert set(out) == set(s_sd) == set(report.tensors)
    student.load_state_dict(out)
    return out, report.depth_maps


def _logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


TOKENS = torch.randint(0, 97, (2, T_SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("width", list_width_strategies())
@pytest.mark.parametrize("depth", list_depth_strategies())
def test_every_strategy_grows_a_tied_gqa_member_and_keeps_the_tie(width, depth):
    t_cfg, s_cfg = _cfg(), _cfg(width=48, layers=3, heads=6, kv_heads=3, mlp=80)
    teacher, student = _model(t_cfg, 0), _model(s_cfg, 1)
    out, depth_maps = _grow(teacher, t_cfg, student, s_cfg, width, depth)
    assert len(depth_maps["decoder"]) == 3
    torch.testing.assert_close(out["lm_head.weight"], out["model.embed_tokens.weight"], rtol=0, atol=0)
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert torch.isfinite(_logits(student, TOKENS)).all()


def test_insert_copies_teacher_heads_rows_and_units_into_the_leading_block():
    t_cfg, s_cfg = _cfg(), _cfg(width=48, layers=2, heads=6, kv_heads=3, mlp=80)
    teacher, student = _model(t_cfg, 0), _model(s_cfg, 1)
    fresh = {k: v.clone() for k, v in student.state_dict().items()}
    out, _ = _grow(teacher, t_cfg, student, s_cfg, "insert", "duplicate")
    t_sd = teacher.state_dict()
    for key in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight"):
        k = f"model.layers.1.{key}"
        rows, cols = t_sd[k].shape
        torch.testing.assert_close(out[k][:rows, :cols], t_sd[k], rtol=0, atol=0)
        torch.testing.assert_close(out[k][rows:], fresh[k][rows:], rtol=0, atol=0)


def _tagged_teacher(cfg):
    """A teacher whose q_proj rows hold their query head's index and k/v rows their kv head's."""
    model = _model(cfg, 0)
    hd = cfg["head_dim"]
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.q_proj.weight.copy_(torch.arange(cfg["num_attention_heads"]).repeat_interleave(hd)[:, None])
            for proj in (attn.k_proj, attn.v_proj):
                proj.weight.copy_(torch.arange(cfg["num_key_value_heads"]).repeat_interleave(hd)[:, None])
    return model


@pytest.mark.parametrize("width", ["insert", "duplicate", "net2net"])
def test_each_query_head_keeps_the_kv_head_of_its_group(width):
    # 8 query heads / 4 kv heads -> 12 / 6: a ratio of 1.5, so duplicate wraps and net2net draws at
    # random. The residual width stays 48 so that every q/k/v column holds its row's tag unscaled.
    t_cfg, s_cfg = _cfg(width=48, heads=8, kv_heads=4), _cfg(width=48, heads=12, kv_heads=6, mlp=96)
    teacher, student = _tagged_teacher(t_cfg), _model(s_cfg, 1)
    out, _ = _grow(teacher, t_cfg, student, s_cfg, width, "duplicate", seed=3)
    hd, group, rows = 8, 2, 0
    inherited = 4 if width == "insert" else 6  # kv heads that came from the teacher
    for layer in range(2):
        q = out[f"model.layers.{layer}.self_attn.q_proj.weight"][:, 0].reshape(12, hd)
        for name in ("k_proj", "v_proj"):
            kv = out[f"model.layers.{layer}.self_attn.{name}.weight"][:, 0].reshape(6, hd)
            for head in range(group * inherited):
                # every entry of a head comes from one teacher head (head_dim is never mixed) ...
                assert (q[head] == q[head, 0]).all() and (kv[head // group] == kv[head // group, 0]).all()
                # ... and teacher query head h reads teacher kv head h // G, so must the student's
                assert int(q[head, 0]) // group == int(kv[head // group, 0]), (layer, head)
                rows += 1
    assert rows == 2 * 2 * group * inherited
    if width == "net2net":  # the random draws did pick a kv head other than the round-robin one
        assert out["model.layers.0.self_attn.k_proj.weight"][:, 0].reshape(6, hd)[4:, 0].tolist() != [0, 1]


def test_net2net_is_function_preserving_for_an_integer_width_ratio():
    t_cfg = _cfg(tied=False)
    s_cfg = _cfg(width=64, heads=8, kv_heads=4, mlp=80, tied=False)
    teacher, student = _model(t_cfg, 0), _model(s_cfg, 1)
    t, s = describe(teacher.state_dict(), t_cfg, "t"), describe(student.state_dict(), s_cfg, "s")
    assert net2net_notes(t, s) == []
    _grow(teacher, t_cfg, student, s_cfg, "net2net", "duplicate", seed=5)
    torch.testing.assert_close(_logits(student, TOKENS), _logits(teacher, TOKENS), atol=1e-5, rtol=1e-4)


def test_same_sizes_insert_reproduces_the_teacher():
    cfg = _cfg()
    teacher, student = _model(cfg, 0), _model(cfg, 1)
    _grow(teacher, cfg, student, cfg, "insert", "duplicate")
    torch.testing.assert_close(_logits(student, TOKENS), _logits(teacher, TOKENS), atol=0, rtol=0)


def test_untied_student_of_a_tied_teacher_takes_the_shared_matrix_for_both():
    t_cfg, s_cfg = _cfg(tied=True), _cfg(width=48, heads=6, kv_heads=3, mlp=80, tied=False)
    teacher, student = _model(t_cfg, 0), _model(s_cfg, 1)
    out, _ = _grow(teacher, t_cfg, student, s_cfg, "insert", "duplicate")
    embed = teacher.model.embed_tokens.weight
    torch.testing.assert_close(out["lm_head.weight"][:, :32], embed, rtol=0, atol=0)
    assert student.lm_head.weight is not student.model.embed_tokens.weight


def test_net2net_notes_name_what_is_not_exact():
    t = describe(_model(_cfg(), 0).state_dict(), _cfg(), "t")
    s_cfg = _cfg(width=48, layers=3, heads=6, kv_heads=3, mlp=80)
    s = describe(_model(s_cfg, 1).state_dict(), s_cfg, "s")
    notes = " ".join(net2net_notes(t, s))
    assert "not an integer ratio" in notes and "depth 2 -> 3" in notes and "tied" in notes


@pytest.mark.parametrize(
    ("student", "message"),
    [
        (dict(head_dim=16, width=64), "head_dim differs"),
        (dict(width=64, heads=8, kv_heads=2), "GQA group sizes differ"),
        (dict(vocab=128), "vocabulary sizes differ"),
        (dict(width=16, heads=2, kv_heads=1, mlp=32), "smaller than its teacher"),
    ],
)
def test_preconditions_name_the_problem(student, message):
    t_cfg, s_cfg = _cfg(), _cfg(**student)
    with pytest.raises(GrowError, match=message):
        _grow(_model(t_cfg, 0), t_cfg, _model(s_cfg, 1), s_cfg)


def test_a_tied_student_cannot_inherit_an_untied_teacher():
    t_cfg, s_cfg = _cfg(tied=False), _cfg(width=48, heads=6, kv_heads=3, tied=True)
    with pytest.raises(GrowError, match="untie the student"):
        _grow(_model(t_cfg, 0), t_cfg, _model(s_cfg, 1), s_cfg)


def test_describe_rejects_a_config_that_does_not_fit_the_state_dict():
    cfg = _cfg()
    sd = _model(cfg, 0).state_dict()
    with pytest.raises(GrowError, match="num_hidden_layers=3"):
        describe(sd, {**cfg, "num_hidden_layers": 3}, "teacher")
    with pytest.raises(GrowError, match=r"q_proj.weight is \(32, 32\) but its model_cfg gives \(64, 32\)"):
        describe(sd, {**cfg, "num_attention_heads": 8, "num_key_value_heads": 4}, "teacher")
    with pytest.raises(GrowError, match="did you mean 'hidden_size'"):
        describe(sd, {**cfg, "hiden_size": 3}, "teacher")


def test_grow_on_models_finds_the_lm_layout_and_matches_the_state_dict_path():
    t_cfg, s_cfg = _cfg(), _cfg(width=48, layers=3, heads=6, kv_heads=3, mlp=80)
    teacher = _model(t_cfg, 0)
    by_sd, by_model = _model(s_cfg, 1), _model(s_cfg, 1)
    _grow(teacher, t_cfg, by_sd, s_cfg, "net2net", "interval", seed=2)
    report = grow(teacher, by_model, width="net2net", depth="interval", seed=2)  # hints from the models
    assert report.depth_maps == {"decoder": [0, None, 1]} and report.notes
    for key, value in by_sd.state_dict().items():
        torch.testing.assert_close(by_model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert by_model.lm_head.weight is by_model.model.embed_tokens.weight


def test_a_clip_model_cannot_grow_into_a_llama():
    from compt.families import create

    with pytest.raises(GrowError, match="different paradigms"):
        grow(create("debug-S"), _model(_cfg(), 0))
