"""Text data of the LM paradigm: corpora, train/validation split, token streams, batches (issue 14, item 4).

Three sources (:class:`LMDataConfig` ``source``):

- ``stdlib``, the embedded default: the running Python's standard-library source
  (``sysconfig.get_paths()["stdlib"]``), real text no one here wrote, with every ``test`` / ``tests`` /
  ``idle_test`` directory, ``site-packages`` and caches left out (about 12 MB of ``.py``; the bytes vary
  with the Python version, so results name it).
- ``text``: a folder of ``.txt`` files (one document each) and ``.jsonl`` files (one document per
  line, its ``"text"`` field). Unreadable files and bad lines are counted skips, as in the CLIP data.
- ``tokens``: pre-tokenized ``train.bin`` / ``val.bin`` of uint16 or uint32 ids, memory-mapped (the
  layout of nanoGPT's ``prepare.py``), for corpora too large to tokenize here.

Documents are split into train / validation **by document**, deterministically: a document is held
out when the CRC-32 of its key (its relative path, ``path:line`` for a JSONL line) falls in the first
``val_fraction`` of the range, so the split does not depend on listing order and a file never
straddles it. Each split is one token stream, documents in key order, each followed by
``<|endoftext|>``. :func:`prepare_data` tokenizes once and keeps the streams and the tokenizer in a
cache directory beside the run; a tokenizer found there is always reused, never re-trained.

A sample is a window of ``seq_len + 1`` tokens (inputs and shifted targets); window ``i`` starts at
``i * seq_len``. :class:`TokenLoader` orders windows by ``compt.engine.loader.epoch_order(seed, epoch)``
and gives rank ``r`` the ``r``-th slice of global batch ``b``, so what a step sees depends only on
``(seed, epoch, step)``: the same for any world size, and a resume at ``start_step`` is exact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sysconfig
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from compt.engine.loader import DataError, Loader, epoch_order, format_skips
from compt.paradigms.lm.tokenizer import (
    FILENAME,
    byte_tokenizer,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    token_bytes,
    train_bpe,
)

__all__ = [
    "LMDataConfig",
    "LMData",
    "stdlib_root",
    "read_documents",
    "is_validation",
    "prepare_data",
    "TokenWindows",
    "TokenLoader",
    "eval_windows",
]

log = logging.getLogger("compt.data")

SOURCES = ("stdlib", "text", "tokens")
TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
# The fields that change the token streams (a new seed or eval_windows reuses them).
_TOKEN_FIELDS = ("source", "path", "tokenizer", "vocab_size", "val_fraction", "max_skips")
_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class LMDataConfig:
    """Where an LM's text comes from and how it becomes token windows."""

    source: str = "stdlib"  # "stdlib" (embedded), "text" (folder of .txt/.jsonl) or "tokens" (.bin files)
    path: str | None = None  # text: the folder; tokens: the folder holding train.bin and val.bin
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "byte", a tokenizer.json, or "none" (tokens)
    vocab_size: int = 4096  # tokens of the trained BPE (tokenizer="bpe" only)
    seq_len: int = 128  # tokens per sample (a batch row holds seq_len + 1)
    val_fraction: float = 0.05  # share of documents held out for validation (by document key)
    token_dtype: str = "uint16"  # id type of a tokens source's .bin files: "uint16" or "uint32"
    max_skips: int = 100  # unreadable files / bad JSONL lines tolerated before preparation fails
    seed: int = 0  # the window order of epoch e is a permutation seeded by (seed, e)
    eval_windows: int = 256  # validation windows of seq_len tokens per evaluation, spread over the split
    cache_dir: str | None = None  # tokenizer.json + token files; None: <out_dir>/data of the run or chain

    def __post_init__(self):
        checks = [
            ("source", self.source in SOURCES, f"must be one of {', '.join(SOURCES)}"),
            ("path", self.source == "stdlib" or bool(self.path), f"is required for source {self.source!r}"),
            ("vocab_size", self.vocab_size >= 257, "must be >= 257 (256 bytes + <|endoftext|>)"),
            ("seq_len", self.seq_len >= 1, "must be >= 1"),
            ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("token_dtype", self.token_dtype in TOKEN_DTYPES, "must be uint16 or uint32"),
            ("max_skips", self.max_skips >= 0, "must be >= 0"),
            ("eval_windows", self.eval_windows >= 1, "must be >= 1"),
        ]
        if self.source == "tokens":
            checks.append(
                (
                    "tokenizer",
                    self.tokenizer not in ("bpe", "byte"),
                    "must be the tokenizer.json that made the token files, or 'none' (no bits per byte), "
                    "for source 'tokens'",
                )
            )
        else:
            checks.append(("tokenizer", self.tokenizer != "none", "'none' is only for source 'tokens'"))
        for name, ok, what in checks:
            if not ok:
                raise ValueError(f"data.{name}={getattr(self, name)!r} {what}")


@dataclass
class LMData:
    """Both token streams of a prepared source and what decodes them."""

    train: np.ndarray  # 1-D token ids (a memmap for token files)
    val: np.ndarray
    tokenizer: Tokenizer | None  # None: a token source without its tokenizer.json
    token_bytes: np.ndarray | None  # bytes per id, for bits per byte (None without a tokenizer)
    skips: dict[str, int]
    documents: dict[str, int]  # {"train": n, "val": n} (empty for token files)


# --- documents -----------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The running Python's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_validation(key: str, val_fraction: float) -> bool:
    """Whether document ``key`` is held out: the CRC-32 of the key falls in the first ``val_fraction``."""
    return zlib.crc32(key.encode("utf-8")) < val_fraction * 2**32


def _read(path: Path, key: str, skips: Counter) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        skips["not_utf8"] += 1
        log.warning("skipping %s: not UTF-8 (%s)", key, e.reason)
        return None
    except OSError as e:
        skips["unreadable"] += 1
        log.warning("skipping %s: %s", key, e)
        return None
    return text if text.strip() else None  # an empty file (a bare __init__.py) has nothing to learn


def _jsonl(path: Path, rel: str, skips: Counter) -> Iterator[tuple[str, str]]:
    text = _read(path, rel, skips)
    for n, line in enumerate((text or "").splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            doc = None
        if isinstance(doc, str) and not doc.strip():
            continue
        if not isinstance(doc, str):
            skips["bad_jsonl_line"] += 1
            if skips["bad_jsonl_line"] <= 5:
                log.warning('skipping %s line %d: not a JSON object with a "text" string', rel, n)
            continue
        yield f"{rel}:{n}", doc


def read_documents(cfg: LMDataConfig) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """``[(key, text), ...]`` sorted by key, and the skip counts; raises :class:`DataError` past max_skips."""
    if cfg.source == "stdlib":
        root, patterns = stdlib_root(), ("*.py",)
    elif cfg.source == "text":
        root, patterns = Path(cfg.path), ("*.txt", "*.jsonl")
        if not root.is_dir():
            raise DataError(
                f"data.path={cfg.path!r} is not a folder; point it at a folder of .txt/.jsonl files"
            )
    else:
        raise DataError(f"source {cfg.source!r} is pre-tokenized; it has no documents to read")
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for pattern in patterns
        for p in root.rglob(pattern)
        if p.is_file() and not _EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    docs, skips = [], Counter()
    for rel, path in files:
        if path.suffix == ".jsonl":
            docs.extend(_jsonl(path, rel, skips))
        elif (text := _read(path, rel, skips)) is not None:
            docs.append((rel, text))
    where = "the Python standard library" if cfg.source == "stdlib" else cfg.path
    if sum(skips.values()) > cfg.max_skips:
        raise DataError(
            f"{where}: {format_skips(skips)} -- more than data.max_skips={cfg.max_skips}; fix or remove "
            "the bad files, or raise data.max_skips"
        )
    if skips:
        log.warning("%s: %s", where, format_skips(skips))
    if not docs:
        raise DataError(
            f"{where}: no documents (.txt, .jsonl{', .py' if cfg.source == 'stdlib' else ''}) found"
        )
    return sorted(docs), dict(skips)


def _split(docs: list[tuple[str, str]], val_fraction: float, where: str) -> tuple[list[str], list[str]]:
    train = [text for key, text in docs if not is_validation(key, val_fraction)]
    val = [text for key, text in docs if is_validation(key, val_fraction)]
    if not train or not val:
        empty = "validation" if not val else "training"
        raise DataError(
            f"{where}: the {empty} split is empty ({len(docs)} documents, val_fraction={val_fraction}); "
            "add documents or change data.val_fraction"
        )
    return train, val


# --- preparation and its cache -------------------------------------------------------------------


def _write_tokens(path: Path, tokens: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tokens.tofile(tmp)
    os.replace(tmp, path)


def _memmap(path: Path, dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"no token file {path}; a tokens source holds train.bin and val.bin")
    size = path.stat().st_size
    itemsize = np.dtype(dtype).itemsize
    if size == 0 or size % itemsize:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {np.dtype(dtype).name} ids; "
            "check data.token_dtype (uint16 or uint32)"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _tokenizer(cfg: LMDataConfig, cache: Path, train_texts: list[str]) -> Tokenizer:
    """The run's tokenizer: reloaded from the cache if it is there (never re-trained), else made."""
    if (cache / FILENAME).is_file():
        tok = load_tokenizer(cache)
        wanted = {"bpe": cfg.vocab_size, "byte": 257}.get(cfg.tokenizer)
        if wanted is not None and tok.get_vocab_size() != wanted:
            log.warning(
                "%s: reusing the run's %d-token tokenizer although data.tokenizer=%s asks for %d tokens; "
                "the members of this run were trained with it (use a new run directory for a new one)",
                cache / FILENAME,
                tok.get_vocab_size(),
                cfg.tokenizer,
                wanted,
            )
        return tok
    if cfg.tokenizer == "bpe":
        tok = train_bpe(train_texts, cfg.vocab_size)
    elif cfg.tokenizer == "byte":
        tok = byte_tokenizer()
    else:
        tok = load_tokenizer(cfg.tokenizer)
    save_tokenizer(tok, cache)
    return tok


def prepare_data(cfg: LMDataConfig, cache_dir: str | Path) -> LMData:
    """Read, split and tokenize ``cfg``'s source, keeping the tokenizer and the token streams in
    ``cache_dir`` (``tokenizer.json``, ``train.bin``, ``val.bin``, ``tokens.json``); a second call with
    the same config and the same documents only memory-maps them."""
    cache = Path(cache_dir)
    if cfg.source == "tokens":
        dtype = TOKEN_DTYPES[cfg.token_dtype]
        train, val = _memmap(Path(cfg.path) / "train.bin", dtype), _memmap(Path(cfg.path) / "val.bin", dtype)
        tok = None if cfg.tokenizer == "none" else load_tokenizer(cfg.tokenizer)
        return LMData(train, val, tok, None if tok is None else token_bytes(tok), {}, {})
    docs, skips = read_documents(cfg)
    train_texts, val_texts = _split(docs, cfg.val_fraction, cfg.path or "the Python standard library")
    digest = hashlib.sha256()
    for key, text in docs:
        digest.update(f"{key}\0{len(text)}\0".encode())
        digest.update(text.encode("utf-8", "surrogatepass"))
    cache.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(cfg, cache, train_texts)
    meta = {
        "config": {k: v for k, v in asdict(cfg).items() if k in _TOKEN_FIELDS},
        "documents": digest.hexdigest(),
        "tokenizer": hashlib.sha256(tok.to_str().encode()).hexdigest(),
    }
    meta_path = cache / "tokens.json"
    dtype = np.uint16 if tok.get_vocab_size() <= 1 << 16 else np.uint32
    if meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        train, val = _memmap(cache / "train.bin", dtype), _memmap(cache / "val.bin", dtype)
    else:
        train, val = encode_documents(tok, train_texts), encode_documents(tok, val_texts)
        _write_tokens(cache / "train.bin", train)
        _write_tokens(cache / "val.bin", val)
        meta_path.write_text(json.dumps(meta, indent=1))
    documents = {"train": len(train_texts), "val": len(val_texts)}
    return LMData(train, val, tok, token_bytes(tok), skips, documents)


# --- samples and batches -------------------------------------------------------------------------


class TokenWindows:
    """Non-overlapping windows of ``seq_len + 1`` tokens of one stream (a :class:`MapDataset`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, where: str = "tokens"):
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{where}: {len(tokens)} tokens is less than one window of seq_len + 1 = {seq_len + 1}; "
                "use more text or a smaller data.seq_len"
            )
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def load(self, index: int, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Window ``index``: tokens ``[index * seq_len, (index + 1) * seq_len]``, int64 ``[seq_len + 1]``."""
        lo = index * self.seq_len
        return torch.from_numpy(np.asarray(self.tokens[lo : lo + self.seq_len + 1], dtype=np.int64))


class TokenLoader(Loader):
    """Per-rank batches ``(tokens [global_batch_size / world_size, seq_len + 1],)`` of one epoch's windows.

    ``len()`` is the steps of a full epoch (the last partial batch dropped); iteration yields the
    steps ``start_step .. len - 1``, each a 1-tuple as every compt loader yields a tuple of tensors.
    Windows cannot be bad, so nothing is ever skipped here. ``pin_memory``: pinned batches (CUDA).
    """

    def __init__(
        self,
        windows: TokenWindows,
        *,
        seed: int,
        epoch: int,
        global_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        shuffle: bool = True,
        source: str = "tokens",
    ):
        if global_batch_size % world_size:
            raise DataError(
                f"global batch size {global_batch_size} is not divisible by the world size {world_size}"
            )
        if len(windows) < global_batch_size:
            raise DataError(
                f"{source}: {len(windows)} windows of {windows.seq_len + 1} tokens is fewer than one global "
                f"batch of {global_batch_size}; use more text, a smaller batch or a smaller data.seq_len"
            )
        super().__init__(
            steps=len(windows) // global_batch_size, start_step=start_step, max_skips=0, source=source
        )
        self.windows = windows
        self.order = epoch_order(len(windows), seed, epoch, shuffle)
        self.local = global_batch_size // world_size
        self.offset = rank * self.local
        self.global_batch_size = global_batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor]]:
        for step in range(self.start_step, self.steps):
            lo = step * self.global_batch_size + self.offset
            batch = torch.stack([self.windows.load(i) for i in self.order[lo : lo + self.local].tolist()])
            yield (batch.pin_memory() if self.pin_memory else batch,)


def eval_windows(tokens: np.ndarray, seq_len: int, num_windows: int) -> torch.Tensor:
    """A fixed held-out set: ``num_windows`` windows spread evenly over the validation stream
    (all of them if it has fewer), int64 ``[n, seq_len + 1]``; independent of seeds and epochs."""
    windows = TokenWindows(tokens, seq_len, "the validation split")
    n = min(num_windows, len(windows))
    picks = np.linspace(0, len(windows) - 1, n).round().astype(int)
    return torch.stack([windows.load(int(i)) for i in picks])
