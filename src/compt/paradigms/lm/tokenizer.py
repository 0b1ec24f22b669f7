"""Tokenizers of the LM paradigm, trained offline (issue 14, item 4).

Two kinds, both a Hugging Face ``tokenizers.Tokenizer`` with GPT-2's byte-level pre-tokenizer and
decoder, so both are lossless on any UTF-8 text, save to one ``tokenizer.json`` and export to
``transformers`` unchanged:

- :func:`train_bpe`: a byte-level BPE trained on the run's training split (about 4k tokens; seconds on
  the embedded corpus). Training is deterministic: the same texts give the same file.
- :func:`byte_tokenizer`: the 256 bytes and no merges, which needs no training at all.

Both end with one special token, ``<|endoftext|>`` (:data:`EOS`), written between documents.
:func:`token_bytes` gives each id's length in bytes (0 for the special token), what bits per byte
needs (:mod:`compt.paradigms.lm.evaluate`). A run saves its tokenizer beside its checkpoints
(:func:`save_tokenizer`) and reloads it from there on resume, so a member never sees a re-trained one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "EOS",
    "FILENAME",
    "train_bpe",
    "byte_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "eos_id",
    "token_bytes",
    "encode_documents",
]

EOS = "<|endoftext|>"
FILENAME = "tokenizer.json"


def _byte_level(model: models.Model) -> Tokenizer:
    tok = Tokenizer(model)
    # GPT-2's byte-to-unicode table: every byte is one symbol, so nothing is ever unknown or lost.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_bpe(texts: Sequence[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE of ``vocab_size`` tokens (256 bytes, the merges, :data:`EOS`) trained on ``texts``."""
    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE needs vocab_size >= 257 (256 bytes + {EOS}), got {vocab_size}")
    if not texts:
        raise ValueError("train_bpe got no texts; the training split is empty")
    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return tok


def byte_tokenizer() -> Tokenizer:
    """The 256 bytes as tokens (ids 0..255 in the byte-level alphabet's order) plus :data:`EOS` (256)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = _byte_level(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.add_special_tokens([EOS])
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> Path:
    """Write ``directory/tokenizer.json`` atomically (a crash leaves the old file or none) and return it."""
    path = Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(tok.to_str(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer saved by :func:`save_tokenizer` (a ``tokenizer.json`` or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}; a run writes one with save_tokenizer")
    tok = Tokenizer.from_file(str(path))
    eos_id(tok)  # fails early on a tokenizer.json that is not one of ours
    return tok


def eos_id(tok: Tokenizer) -> int:
    """The id of :data:`EOS` (a ``ValueError`` if the tokenizer lacks it)."""
    i = tok.token_to_id(EOS)
    if i is None:
        raise ValueError(f"the tokenizer has no {EOS} token; build it with train_bpe or byte_tokenizer")
    return i


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """Bytes per token id (int64 ``[vocab_size]``); special tokens count 0."""
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for token, i in tok.get_vocab().items():
        # In the byte-level alphabet every character stands for exactly one byte.
        out[i] = 0 if token in special else len(token)
    return out


def encode_documents(tok: Tokenizer, texts: Iterable[str]) -> np.ndarray:
    """Documents as one token stream, each followed by :data:`EOS` (uint16 if the vocabulary fits).

    A literal ``<|endoftext|>`` inside a document is encoded as text, not as the separator (GPT-2's
    tokenizer would end the document there).
    """
    eos = eos_id(tok)
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True  # a runtime switch, not saved in tokenizer.json
    try:
        encoded = tok.encode_batch(list(texts))
    finally:
        tok.encode_special_tokens = before
    parts = [np.asarray(e.ids + [eos], dtype=dtype) for e in encoded]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
