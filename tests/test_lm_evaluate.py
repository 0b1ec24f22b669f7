"""Validation loss and bits per byte (compt.paradigms.lm.evaluate) on real tiny models and real text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compt.paradigms.lm.data import eval_windows
from compt.paradigms.lm.evaluate import evaluate_lm
from compt.paradigms.lm.models import build_model, llama_cfg
from compt.paradigms.lm.tokenizer import byte_tokenizer, encode_documents, token_bytes, train_bpe

torch.set_num_threads(1)
DOCS = [f"def f{i}(x):\n    return x * {i}  # café\n" * 3 for i in range(30)]


def _model(vocab, seed=0):
    torch.manual_seed(seed)
    cfg = llama_cfg(
        width=32,
        layers=1,
        heads=4,
        kv_heads=2,
        head_dim=8,
        mlp=48,
        vocab_size=vocab,
        context_length=32,
        tied=True,
    )
    return build_model(cfg)


def test_loss_is_the_mean_nll_and_bpb_counts_text_bytes_only():
    tok = byte_tokenizer()
    stream = encode_documents(tok, DOCS)
    windows = eval_windows(stream, seq_len=16, num_windows=20)
    model = _model(257)
    got = evaluate_lm(model, windows, token_bytes(tok), batch_size=7)
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    nll = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
    assert got["val_loss"] == pytest.approx(nll.mean().item(), rel=1e-6)
    text = windows[:, 1:].flatten() != 256  # the byte tokenizer: 1 byte per token but <|endoftext|>
    assert got["val_bytes"] == text.sum().item() and got["val_tokens"] == 20 * 16
    assert got["val_bpb"] == pytest.approx(nll[text].sum().item() / math.log(2) / text.sum().item(), rel=1e-6)


def test_bpb_compares_tokenizers_where_loss_per_token_does_not():
    # A model that knows nothing predicts uniformly: log2(V) bits per token, spread over the bytes the
    # tokens hold. Bits per byte is then log2(V) / (bytes per token), whatever the tokenizer.
    for tok in (byte_tokenizer(), train_bpe(DOCS, vocab_size=300)):
        model = _model(tok.get_vocab_size())
        torch.nn.init.zeros_(model.lm_head.weight)  # tied: the embeddings too; every logit is 0
        stream = encode_documents(tok, DOCS)
        windows = eval_windows(stream, seq_len=16, num_windows=50)
        got = evaluate_lm(model, windows, token_bytes(tok))
        v = tok.get_vocab_size()
        targets = windows[:, 1:].flatten().numpy()
        sizes = token_bytes(tok)[targets]
        assert got["val_loss"] == pytest.approx(math.log(v), rel=1e-5)
        assert got["val_bpb"] == pytest.approx(math.log2(v) * (sizes > 0).sum() / sizes.sum(), rel=1e-5)


def test_evaluation_restores_the_training_mode_and_works_without_a_tokenizer():
    model = _model(257).train()
    windows = torch.randint(0, 257, (4, 9), generator=torch.Generator().manual_seed(0))
    got = evaluate_lm(model, windows, None)
    assert model.training and math.isnan(got["val_bpb"]) and got["val_tokens"] == 32
    with pytest.raises(ValueError, match=r"eval windows \[N, T \+ 1\]"):
        evaluate_lm(model, windows[:0], None)
    assert np.isfinite(got["val_loss"])
