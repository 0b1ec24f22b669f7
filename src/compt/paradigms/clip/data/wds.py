"""Webdataset shards from img2dataset (jpg + txt + json per sample), streamed per rank and worker (§4).

CC3M / CC12M are usually downloaded with img2dataset into tar shards ``{00000..00331}.tar``, each
sample a ``<key>.jpg``, ``<key>.txt`` (the raw caption) and ``<key>.json`` (metadata; DreamLIP's
release puts its long captions there, e.g. ``longSV_captions``). ``data.path`` takes a brace
pattern (several joined by ``::``); ``data.wds_caption_keys`` names the json fields whose text
becomes sub-captions (strings are split into sentences, lists taken item by item, App. A).

Streaming and determinism. Each epoch the shard list is permuted from ``(seed, epoch)``; rank ``r``
of ``W`` takes every ``W``-th shard, and its ``K`` workers split those again, so every stream
reads disjoint shards (at least ``W*K`` shards are needed). Each stream cycles over its shards
(re-permuted every pass) through a seeded shuffle buffer, and step ``s`` is served by stream
``s % K``; each batch consumes exactly ``B`` raw samples (bad ones are dropped from the batch, not
replaced; a batch of only bad samples borrows from the stream's next batches, which are read
ahead and still served in their own turn, so the consumption per batch does not change). A
sample's captions and crop come from a generator seeded by ``(seed, epoch, its key)``. So a run is
reproducible for a fixed world size and worker count, and ``start_step`` resumes exactly: the
skipped batches' tar members are read but not decoded. Unlike the map-style sets, the batches do
depend on the world size and the worker count (shards are split across streams).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from compt.engine.loader import (
    DataError,
    Loader,
    Repair,
    Repaired,
    Skip,
    collate,
    epoch_order,
    ignore_stop_signals,
    refill_batch,
    sort_out,
)
from compt.paradigms.clip.data.captions import caption_pool, parse_caption_cell, sample_captions
from compt.paradigms.clip.data.images import ImageError, eval_transform, open_image, train_transform

__all__ = ["ShardDataset", "StreamLoader", "expand_shards", "dataset_size"]

log = logging.getLogger("compt.paradigms.clip.data")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def expand_shards(pattern: str) -> list[str]:
    """``a/{00000..00002}.tar::b.tar`` -> the list of shard paths/URLs."""
    return list(wds.shardlists.expand_urls(pattern))


def dataset_size(shards: list[str]) -> int | None:
    """Samples in ``shards`` from ``sizes.json``/``__len__`` (open_clip) or img2dataset ``*_stats.json``."""
    folder = Path(shards[0]).parent
    sizes = folder / "sizes.json"
    if sizes.is_file():
        table = _read_size_file(sizes, json.loads)
        try:
            return sum(int(table[Path(s).name]) for s in shards)
        except KeyError as e:
            raise DataError(f"{sizes}: no entry for shard {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise DataError(
                f"{sizes}: expected {{shard name: sample count}} ({e}); fix or delete it"
            ) from None
    if (folder / "__len__").is_file():
        return _read_size_file(folder / "__len__", lambda text: int(text.strip()))
    stats = [Path(s).with_name(Path(s).stem + "_stats.json") for s in shards]
    if all(p.is_file() for p in stats):
        return sum(_read_size_file(p, lambda text: int(json.loads(text).get("successes", 0))) for p in stats)
    return None


def _read_size_file(path: Path, parse):
    """``parse(text of path)``; a DataError naming the file when it is not what it should be."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, AttributeError) as e:  # bad JSON, a list, a non-number
        raise DataError(
            f"{path}: cannot read the sample count ({type(e).__name__}: {e}); fix or delete the file, "
            "or set data.num_samples"
        ) from None


def _tar_samples(url: str) -> Iterator[dict | Skip]:
    """Samples (ext -> bytes, plus ``__key__``) of one shard; a missing/truncated shard yields a Skip."""
    if _is_local(url) and not os.path.isfile(url):
        yield Skip("missing_file", url, "(shard not found)")
        return
    current: dict | None = None
    try:
        with wds.gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        # A truncated or corrupt tar: keep what was read before the damage, count the shard once.
        yield Skip("truncated_tar", url, f"({type(e).__name__}: {e})")
        return
    if current is not None:
        yield current


class ShardDataset:
    """img2dataset shards; ``decode(raw, rng)`` turns one raw sample into (image, M tokens) or Skip."""

    def __init__(self, cfg, *, image_size: int, tokenize):
        if not cfg.path:
            raise DataError(
                "data.path is empty: set it to the shard pattern, e.g. data.path='cc3m/{00000..00331}.tar'"
            )
        self.shards = expand_shards(cfg.path)
        local = [s for s in self.shards if _is_local(s)]
        if local and not any(os.path.isfile(s) for s in local):
            raise DataError(
                f"data.path {cfg.path}: none of the {len(self.shards)} shards exists (first: {local[0]})"
            )
        size = cfg.num_samples or dataset_size(self.shards)
        if not size:
            raise DataError(
                f"data.path {cfg.path}: set data.num_samples (samples per epoch); no sizes.json, __len__ "
                f"or img2dataset *_stats.json next to the shards gives it"
            )
        self.num_samples = int(size)
        self.cfg, self.image_size, self.tokenize = cfg, image_size, tokenize

    def make_loader(self, **kwargs) -> StreamLoader:
        """The per-rank loader over these shards (the StreamDataset protocol)."""
        return StreamLoader(self, **kwargs)

    def _raw_stream(self, shards: list[str], seed_words: list[int]) -> Iterator[dict | Skip]:
        """Endless samples of ``shards``: each pass in a new seeded order, through a shuffle buffer."""
        rng = np.random.default_rng(seed_words)

        def passes():
            for p in range(1 << 62):
                order = shards if p == 0 else [shards[i] for i in rng.permutation(len(shards))]
                produced = 0
                for url in order:
                    for item in _tar_samples(url):
                        produced += 1
                        yield item
                if produced == 0:
                    raise DataError(f"shards {shards[:3]}... hold no samples; check data.path")

        size = self.cfg.wds_shuffle_buffer
        if size == 0:
            yield from passes()
        buf: list = []
        for item in passes():
            if len(buf) < size:
                buf.append(item)
                continue
            j = int(rng.integers(size))
            buf[j], item = item, buf[j]
            yield item
        yield from buf  # unreachable: the stream is endless

    def decode(self, raw: dict | Skip, epoch: int):
        """One raw sample -> (image [3,H,W], tokens [M,L]) or a Skip naming the sample."""
        if isinstance(raw, Skip):
            return raw
        where = f"{raw['__url__']}:{raw['__key__']}"
        ext = next((e for e in _IMAGE_EXTS if e in raw), None)
        if ext is None:
            return Skip("missing_image", where)
        meta: dict = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except ValueError as e:
                return Skip("bad_json", where, str(e))
            if not isinstance(meta, dict):  # a list or a number would fail at meta.get below
                return Skip("bad_json", where, f"(a JSON {type(meta).__name__}, not an object)")
        repair = None
        if "txt" in raw:
            try:
                text = raw["txt"].decode("utf-8")
            except UnicodeDecodeError as e:  # counted, not silently replaced (issue 11 item 8)
                text = raw["txt"].decode("utf-8", errors="replace")
                repair = Repair("non_utf8_text", f"{where}.txt", f"(bytes {e.start}..{e.end} read as U+FFFD)")
        else:
            text = meta.get("caption") or ""
        extra = [meta.get(k) for k in self.cfg.wds_caption_keys]
        raw_caption = " ".join(parse_caption_cell(text)[:1])
        pool = caption_pool(raw_caption, extra, self.cfg.max_sub_captions)
        if not pool:
            return Skip("empty_caption", where)
        digest = hashlib.blake2b(where.encode(), digest_size=8).digest()
        rng = np.random.default_rng([self.cfg.seed & 0xFFFFFFFF, epoch, int.from_bytes(digest, "little")])
        try:
            img = open_image(raw[ext], draft_size=self.image_size)
        except ImageError as e:
            return Skip(e.reason, where, str(e))
        if self.cfg.augment:
            image = train_transform(img, self.image_size, rng)
        else:
            image = eval_transform(img, self.image_size)
        sample = image, self.tokenize(sample_captions(pool, self.cfg.num_captions, rng))
        return sample if repair is None else Repaired(sample, repair)


class _Streams(torch.utils.data.IterableDataset):
    """The per-rank batches; physical worker ``w`` plays stream ``(start_step + w) % K`` (see module doc)."""

    def __init__(
        self,
        ds: ShardDataset,
        *,
        epoch: int,
        rank: int,
        world_size: int,
        local: int,
        steps: int,
        start_step: int,
        num_streams: int,
        collate_args: tuple[int, int, int],
    ):
        self.ds, self.epoch, self.rank, self.world_size, self.local = ds, epoch, rank, world_size, local
        self.steps, self.start_step, self.k, self.collate_args = steps, start_step, num_streams, collate_args
        order = epoch_order(len(ds.shards), ds.cfg.seed, epoch, ds.cfg.shuffle).tolist()
        self.rank_shards = [ds.shards[i] for i in order[rank::world_size]]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        stream = (self.start_step + w) % self.k
        first = (self.start_step + w) // self.k  # local batch index of this worker's first step
        seed_words = [self.ds.cfg.seed & 0xFFFFFFFF, self.epoch, self.rank, self.world_size, stream, self.k]
        raw = self.ds._raw_stream(self.rank_shards[stream :: self.k], seed_words)
        for _ in range(first * self.local):  # resume: read past whole batches without decoding
            next(raw)
        ahead: collections.deque = collections.deque()  # decoded batches read ahead for a refill

        def read_batch():
            return [self.ds.decode(next(raw), self.epoch) for _ in range(self.local)]

        def following():  # this stream's next batches, read ahead and kept to be served in turn
            for i in itertools.count():
                if i == len(ahead):
                    ahead.append(read_batch())
                yield from ahead[i]

        for step in range(self.start_step + w, self.steps, self.k):
            good, notes = [], []
            for out in ahead.popleft() if ahead else read_batch():
                sort_out(out, good, notes)
            if not good:  # every sample bad (issue 11 item 9): borrow from the batches that follow
                good, refill = refill_batch(following(), self.local, self.ds.cfg.max_skips, step)
                notes += refill
            yield (*collate(good, *self.collate_args), notes)


class StreamLoader(Loader):
    """The loader of a :class:`ShardDataset`: ``num_samples // global_batch_size`` steps per epoch."""

    def __init__(
        self,
        ds: ShardDataset,
        *,
        cfg,
        epoch: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        start_step: int,
        source: str,
    ):
        steps = ds.num_samples // global_batch_size
        if steps == 0:
            raise DataError(
                f"{source}: {ds.num_samples} samples is fewer than one global batch of {global_batch_size}"
            )
        super().__init__(steps=steps, start_step=start_step, max_skips=cfg.max_skips, source=source)
        self.workers = cfg.workers
        k = max(1, cfg.workers)
        if len(ds.shards) < world_size * k:
            raise DataError(
                f"{source}: {len(ds.shards)} shards cannot feed {world_size} rank(s) x {k} worker(s); "
                f"use fewer data.workers or more shards"
            )
        local = global_batch_size // world_size
        self.streams = _Streams(
            ds,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            local=local,
            steps=steps,
            start_step=start_step,
            num_streams=k,
            collate_args=(ds.image_size, cfg.num_captions, ds.tokenize.context_length),
        )

    def __iter__(self):
        if self.workers > 0 and self.start_step < self.steps:
            it = iter(
                torch.utils.data.DataLoader(
                    self.streams,
                    batch_size=None,
                    num_workers=self.workers,
                    pin_memory=self.pin_memory,
                    worker_init_fn=ignore_stop_signals,
                )
            )
        else:
            it = iter(self.streams)
        yield from self._deliver(it)
