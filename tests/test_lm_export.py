"""Exported LM members load with plain transformers and give the same logits (compt.paradigms.lm.export)."""

from __future__ import annotations

import pytest
import torch
import transformers

from compt.paradigms.lm.export import check_target, export_lm
from compt.paradigms.lm.models import build_model, llama_cfg
from compt.paradigms.lm.tokenizer import EOS, byte_tokenizer, train_bpe

torch.set_num_threads(1)
DOCS = ["import os\nprint(os.getcwd())\n" * 5, "def add(a, b):\n    return a + b\n" * 5]


@pytest.mark.parametrize("tied", [True, False])
def test_export_loads_with_auto_classes_and_gives_the_same_logits(tmp_path, tied):
    tok = train_bpe(DOCS, vocab_size=280)
    torch.manual_seed(0)
    cfg = llama_cfg(
        width=32,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=8,
        mlp=48,
        vocab_size=280,
        context_length=32,
        tied=tied,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():  # make the output depend on every tensor, norms included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = export_lm(model, tok, tmp_path / "export")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer(DOCS[1], return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(DOCS[1]).ids and tokenizer.decode(ids[0]) == DOCS[1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert loaded.config.eos_token_id == tok.token_to_id(EOS) == tokenizer.eos_token_id


def test_export_checks_what_it_is_given(tmp_path):
    model = build_model(
        llama_cfg(
            width=32,
            layers=1,
            heads=4,
            kv_heads=2,
            head_dim=8,
            mlp=48,
            vocab_size=64,
            context_length=8,
            tied=True,
        )
    )
    with pytest.raises(ValueError, match="257 tokens but the model only 64 embedding rows"):
        export_lm(model, byte_tokenizer(), tmp_path / "a")
    with pytest.raises(TypeError, match="unwrap DDP"):
        export_lm(torch.nn.Sequential(model), None, tmp_path / "b")
    assert (export_lm(model, None, tmp_path / "c") / "config.json").is_file()


def test_an_export_folder_of_another_model_is_refused_unless_forced(tmp_path):
    def tiny(layers: int):
        shape = dict(width=32, heads=4, kv_heads=2, head_dim=8, mlp=48, vocab_size=64, context_length=8)
        return build_model(llama_cfg(layers=layers, tied=True, **shape))

    out = export_lm(tiny(1), None, tmp_path / "export")
    check_target(out, tiny(1))  # the same config: a re-export is fine
    with pytest.raises(ValueError, match=r"another model \(num_hidden_layers 1 vs 2\).*--force"):
        check_target(out, tiny(2))
    check_target(out, tiny(2), force=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        check_target(tmp_path / "file", tiny(1))
