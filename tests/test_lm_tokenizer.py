"""Tokenizers (compt.paradigms.lm.tokenizer): lossless, deterministic, saved and reloaded, byte counts."""

from __future__ import annotations

import numpy as np
import pytest

from compt.paradigms.lm.tokenizer import (
    EOS,
    byte_tokenizer,
    encode_documents,
    eos_id,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    train_bpe,
)

TEXT = "def héllo(x):\n\treturn x  # wörld 🙂\n\n"
CORPUS = [TEXT * 3, "import os\nimport sys\n" * 20, "class A:\n    pass\n" * 10, "\r\n tabs\tand  spaces "]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_round_trip_is_lossless_and_token_bytes_add_up(kind, bpe):
    tok = bpe if kind == "bpe" else byte_tokenizer()
    for text in [*CORPUS, TEXT]:
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert int(token_bytes(tok)[ids].sum()) == len(text.encode("utf-8"))
    assert token_bytes(tok)[eos_id(tok)] == 0


def test_byte_tokenizer_is_one_token_per_byte():
    tok = byte_tokenizer()
    assert tok.get_vocab_size() == 257 and eos_id(tok) == 256
    assert len(tok.encode(TEXT).ids) == len(TEXT.encode("utf-8"))
    assert (token_bytes(tok)[:256] == 1).all()


def test_bpe_merges_and_is_deterministic(bpe):
    assert bpe.get_vocab_size() == 300
    assert len(bpe.encode(CORPUS[1]).ids) < len(CORPUS[1].encode()) / 2  # it learned the repeats
    assert train_bpe(CORPUS, vocab_size=300).to_str() == bpe.to_str()


def test_saved_tokenizer_reloads_identically(tmp_path, bpe):
    path = save_tokenizer(bpe, tmp_path / "run")
    assert path.name == "tokenizer.json" and not list(path.parent.glob("*.tmp"))
    again = load_tokenizer(tmp_path / "run")
    assert again.encode(TEXT).ids == bpe.encode(TEXT).ids and again.to_str() == bpe.to_str()
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "elsewhere")


def test_encode_documents_separates_documents_and_keeps_a_literal_separator_as_text(bpe):
    docs = ["a b", f"x {EOS} y"]
    stream = encode_documents(bpe, docs)
    eos = eos_id(bpe)
    assert stream.dtype == np.uint16 and int((stream == eos).sum()) == 2 and stream[-1] == eos
    first_end = int(np.flatnonzero(stream == eos)[0])
    assert bpe.decode(stream[:first_end].tolist()) == "a b"
    assert bpe.decode(stream[first_end + 1 : -1].tolist(), skip_special_tokens=False) == docs[1]
    assert bpe.encode_special_tokens is False  # the switch is restored


def test_bad_requests_are_explained():
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        train_bpe(CORPUS, vocab_size=100)
    with pytest.raises(ValueError, match="no texts"):
        train_bpe([], vocab_size=300)
