"""Training data for CoM-PT: image + M captions per sample, deterministic across ranks (§3.2, §4, App. A).

Every member of a chain trains on the same data (§4), each image with M = 4 captions drawn from its
pool of raw + sub-captions (§3.2). A data source is a registered *kind*:

* ``synthetic`` -- the embedded compositional set (no download, ``compt.paradigms.clip.data.synthetic``);
* ``csv`` / ``tsv`` -- an OpenCLIP-style table, plus DreamLIP long-caption columns (``...data.tsv``);
* ``wds`` -- img2dataset webdataset shards (``compt.paradigms.clip.data.wds``).

Users add their own with one decorated function returning a
:class:`~compt.engine.loader.MapDataset` (or a
:class:`~compt.engine.loader.StreamDataset`)::

    @register_dataset("my-set")
    def my_set(cfg: DataConfig, *, image_size: int, context_length: int) -> MapDataset:
        return MySet(cfg.path, image_size, tokenizer(context_length), cfg.num_captions)

and select it with ``data.kind=my-set``. :func:`build_loader` turns a config into the per-rank
iterable of ``(images [B,3,H,W], texts [B,M,L])`` batches the trainer consumes.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from compt.engine.loader import (
    DataError,
    Loader,
    MapDataset,
    MapLoader,
    Repair,
    Repaired,
    Skip,
    StreamDataset,
    epoch_order,
    format_skips,
    sample_rng,
)
from compt.paradigms.clip.data.synthetic import SyntheticSpec

__all__ = [
    "DataConfig",
    "DataError",
    "Loader",
    "MapDataset",
    "StreamDataset",
    "Skip",
    "Repair",
    "Repaired",
    "SyntheticSpec",
    "register_dataset",
    "list_datasets",
    "build_dataset",
    "build_loader",
    "tokenizer",
    "Tokenizer",
    "format_skips",
    "sample_rng",
    "epoch_order",
    "DREAMLIP_CAPTION_KEYS",
]

# The caption columns of DreamLIP's CC3M/CC12M release (raw alt-text + short/long captions of
# InstructBLIP, ShareGPT4V and LLaVA-1.5); App. A splits the long ones into sub-captions.
DREAMLIP_CAPTION_KEYS = (
    "shortIB_captions",
    "longIB_captions",
    "shortSV_captions",
    "longSV_captions",
    "shortLLA_captions",
    "longLLA_captions",
)
SYNTHETIC_DEFAULT_SAMPLES = 100_000  # images in the embedded set when data.num_samples is 0
_SEPARATORS = {"\\t": "\t", "tab": "\t", "comma": ",", "\\,": ",", "semicolon": ";", "pipe": "|"}


@dataclass(frozen=True)
class DataConfig:
    """Where the training pairs come from and how they are drawn (one field per option)."""

    kind: str = "synthetic"  # registered dataset kind: synthetic | csv | tsv | wds | your own
    path: str = ""  # csv/tsv: the table file; wds: shard pattern(s) like data/{00000..00331}.tar
    num_samples: int = (
        0  # synthetic: images (0 = 100k); csv: max rows (0 = all); wds: samples/epoch (0 = sizes.json)
    )
    num_captions: int = 4  # M captions drawn per image per step (§3.2)
    seed: int = 0  # data order, caption draws and crops derive from (seed, epoch, index)
    workers: int = 0  # DataLoader worker processes per rank (0 = load in the training process)
    max_skips: int = 100  # bad samples tolerated per epoch per rank before the run stops
    shuffle: bool = True  # shuffle the order every epoch (False: file order, for debugging)
    augment: bool = True  # real images: open_clip's random resized crop (scale 0.9-1); else center crop
    max_sub_captions: int = 15  # sub-captions kept per image from extra captions (App. A: 15 + raw); 0 = all
    csv_img_key: str = "filepath"  # column with the image path (OpenCLIP --csv-img-key)
    csv_caption_key: str = "title"  # column with the raw caption (OpenCLIP --csv-caption-key)
    csv_separator: str = "\t"  # field separator (OpenCLIP --csv-separator); aliases: tab, comma
    csv_extra_caption_keys: tuple[str, ...] = ()  # columns of extra/long captions, split into sentences
    image_root: str = ""  # folder for relative image paths (default: the table's own folder)
    wds_caption_keys: tuple[str, ...] = ()  # json fields with extra captions (str: split; list: items)
    wds_shuffle_buffer: int = 1000  # samples in the per-worker shuffle buffer (0 = shard order)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)  # the embedded set's vocabulary

    def __post_init__(self) -> None:
        if not self.kind:
            raise ValueError("data.kind is empty; use one of " + ", ".join(list_datasets()))
        sep = _SEPARATORS.get(self.csv_separator, self.csv_separator)
        if len(sep) != 1:
            raise ValueError(
                f"data.csv_separator must be one character (or tab/comma), got {self.csv_separator!r}"
            )
        object.__setattr__(self, "csv_separator", sep)
        for name in ("num_samples", "max_skips", "workers", "max_sub_captions", "wds_shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"data.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_captions < 1:
            raise ValueError(f"data.num_captions must be >= 1, got {self.num_captions}")
        for name in ("csv_extra_caption_keys", "wds_caption_keys"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single column given as a string
                value = [v.strip() for v in value.split(",") if v.strip()]
            object.__setattr__(self, name, tuple(value))  # a tuple keeps the config hashable


# --- registry --------------------------------------------------------------------------------------

DatasetFn = Callable[..., "MapDataset | StreamDataset"]
_REGISTRY: dict[str, DatasetFn] = {}


def register_dataset(name: str) -> Callable[[DatasetFn], DatasetFn]:
    """Decorator: register ``fn(cfg, *, image_size, context_length) -> MapDataset | StreamDataset``."""

    def deco(fn: DatasetFn) -> DatasetFn:
        if name in _REGISTRY:
            raise ValueError(f"dataset kind {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_datasets() -> list[str]:
    """The registered dataset kinds."""
    return sorted(_REGISTRY)


_BUILT: dict[tuple, MapDataset | StreamDataset] = {}  # the last few datasets built, newest last
_BUILT_LIMIT = 4


def _file_stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size) if stat.S_ISREG(st.st_mode) else None


def build_dataset(cfg: DataConfig, *, image_size: int, context_length: int) -> MapDataset | StreamDataset:
    """The dataset of ``cfg.kind`` (unknown kinds raise with the closest registered name).

    A trainer builds a loader per epoch (and on resume); the dataset behind it is built once per
    (config, sizes) and reused while its file is unchanged, so a large table is indexed only once.
    """
    if cfg.kind not in _REGISTRY:
        close = difflib.get_close_matches(cfg.kind, list_datasets(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown data.kind {cfg.kind!r}{hint}; registered: {', '.join(list_datasets())}")
    stamp = _file_stamp(cfg.path) if cfg.path else ()
    key = (cfg, image_size, context_length, stamp)
    if stamp is not None and key in _BUILT:
        return _BUILT[key]
    dataset = _REGISTRY[cfg.kind](cfg, image_size=image_size, context_length=context_length)
    if stamp is not None:  # a single file or no file: safe to reuse (shard patterns are cheap anyway)
        _BUILT[key] = dataset
        while len(_BUILT) > _BUILT_LIMIT:
            del _BUILT[next(iter(_BUILT))]
    return dataset


# --- tokenizer -------------------------------------------------------------------------------------


# Printable ASCII (plus whitespace) without '&': text that open_clip's ftfy + HTML-unescape cleaning
# leaves unchanged, so the fast path below may skip it.
_PLAIN = re.compile(r"[\x20-\x25\x27-\x7e\t\n\r]*")


class Tokenizer:
    """open_clip's SimpleTokenizer at a fixed context length, with caches; same ids as open_clip.

    open_clip's BPE and its ftfy cleaning are pure Python. Captions repeat a lot (the embedded set's
    partial captions, prompt templates) and are made of few distinct words, so this memoizes the
    token row of recent texts and the BPE ids of every word; plain-ASCII text skips the ftfy/HTML
    cleaning, which is the identity on it. Anything else goes through open_clip unchanged.
    """

    _base = None  # one BPE vocabulary per process, shared by every context length
    _words: dict[str, list[int]] = {}  # word -> BPE ids (shared, bounded by the vocabulary in use)
    _CACHE_LIMIT = 100_000

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start + end token), got {context_length}")
        if Tokenizer._base is None:
            from open_clip.tokenizer import SimpleTokenizer

            Tokenizer._base = SimpleTokenizer()
        self.context_length = context_length
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def vocab_size(self) -> int:
        """Token ids run over ``0 .. vocab_size - 1`` (a model's ``text_cfg.vocab_size`` must cover them)."""
        return len(Tokenizer._base.encoder)

    def _ids(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no start/end tokens), as ``SimpleTokenizer.encode``."""
        base = Tokenizer._base
        if not _PLAIN.fullmatch(text):
            return base.encode(text)
        ids: list[int] = []
        for word in base.pat.findall(" ".join(text.split()).lower()):
            word_ids = Tokenizer._words.get(word)
            if word_ids is None:
                if len(Tokenizer._words) >= self._CACHE_LIMIT:
                    Tokenizer._words.clear()
                pieces = base.bpe("".join(base.byte_encoder[b] for b in word.encode("utf-8")))
                word_ids = Tokenizer._words[word] = [base.encoder[p] for p in pieces.split(" ")]
            ids.extend(word_ids)
        return ids

    def _row(self, text: str) -> torch.Tensor:
        row = self._cache.get(text)
        if row is None:
            base = Tokenizer._base
            ids = [base.sot_token_id, *self._ids(text), base.eot_token_id]
            if len(ids) > self.context_length:  # truncate, keeping the end token (as open_clip)
                ids = ids[: self.context_length - 1] + [base.eot_token_id]
            row = torch.zeros(self.context_length, dtype=torch.long)
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
            if len(self._cache) >= self._CACHE_LIMIT:  # real captions rarely repeat: start over
                self._cache.clear()
            self._cache[text] = row
        return row

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (int64), open_clip's format."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            return torch.zeros(0, self.context_length, dtype=torch.long)
        return torch.stack([self._row(t) for t in texts])


_TOKENIZERS: dict[int, Tokenizer] = {}


def tokenizer(context_length: int) -> Tokenizer:
    """The open_clip tokenizer for ``context_length``: ``list[str] -> LongTensor[N, L]``."""
    if context_length not in _TOKENIZERS:
        _TOKENIZERS[context_length] = Tokenizer(context_length)
    return _TOKENIZERS[context_length]


# --- loader ----------------------------------------------------------------------------------------


def build_loader(
    cfg: DataConfig,
    *,
    image_size: int,
    context_length: int,
    global_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    start_step: int = 0,
    pin_memory: bool = False,
) -> Loader:
    """Rank ``rank``'s batches of ``epoch``, starting at ``start_step`` (exact mid-epoch resume).

    Yields ``(images float32 [B, 3, H, W], texts int64 [B, M, context_length])`` with
    ``B = global_batch_size // world_size``, minus any bad samples skipped. ``len(loader)`` is the
    number of full global batches in the epoch. ``pin_memory``: worker processes hand over
    page-locked batches (for a CUDA device, see :func:`compt.engine.loader.pin_batches`).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in 0..{world_size - 1} (world_size={world_size})")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise DataError(
            f"global_batch_size {global_batch_size} must be a positive multiple of world_size {world_size}"
        )
    dataset = build_dataset(cfg, image_size=image_size, context_length=context_length)
    source = f"data.kind={cfg.kind}" + (f" ({cfg.path})" if cfg.path else "")
    collate_args = (image_size, cfg.num_captions, context_length)
    if isinstance(dataset, StreamDataset):
        loader = dataset.make_loader(
            cfg=cfg,
            epoch=epoch,
            global_batch_size=global_batch_size,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            source=source,
        )
        loader.pin_memory = pin_memory  # an attribute: StreamDataset.make_loader keeps its signature
        return loader
    if not isinstance(dataset, MapDataset):
        raise DataError(
            f"data.kind={cfg.kind} returned {type(dataset).__name__}, not a MapDataset/StreamDataset"
        )
    loader = MapLoader(
        dataset,
        seed=cfg.seed,
        epoch=epoch,
        shuffle=cfg.shuffle,
        global_batch_size=global_batch_size,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        workers=cfg.workers,
        max_skips=cfg.max_skips,
        collate_args=collate_args,
        source=source,
    )
    loader.pin_memory = pin_memory
    return loader


# --- built-in kinds (implementations imported lazily: no cost for kinds not used) -----------------


@register_dataset("synthetic")
def _synthetic(cfg: DataConfig, *, image_size: int, context_length: int) -> MapDataset:
    from compt.paradigms.clip.data.synthetic import SyntheticDataset

    num_samples = cfg.num_samples or SYNTHETIC_DEFAULT_SAMPLES
    return SyntheticDataset(
        cfg.synthetic,
        num_samples=num_samples,
        seed=cfg.seed,
        image_size=image_size,
        tokenize=tokenizer(context_length),
        num_captions=cfg.num_captions,
    )


@register_dataset("csv")
def _csv(cfg: DataConfig, *, image_size: int, context_length: int) -> MapDataset:
    from compt.paradigms.clip.data.tsv import TableDataset

    return TableDataset(cfg, image_size=image_size, tokenize=tokenizer(context_length))


@register_dataset("tsv")
def _tsv(cfg: DataConfig, *, image_size: int, context_length: int) -> MapDataset:
    return _csv(cfg, image_size=image_size, context_length=context_length)


@register_dataset("wds")
def _wds(cfg: DataConfig, *, image_size: int, context_length: int) -> StreamDataset:
    from compt.paradigms.clip.data.wds import ShardDataset

    return ShardDataset(cfg, image_size=image_size, tokenize=tokenizer(context_length))
