"""Deterministic batching of samples across ranks and workers (§3.2, §4), for every paradigm.

The examples are the CLIP paradigm's (image + M captions per sample, ``compt.paradigms.clip.data``);
two kinds of dataset plug in (see ``compt.paradigms.clip.data.register_dataset``):

* a :class:`MapDataset` (embedded set, CSV/TSV) knows its length and loads sample ``i`` given a
  generator. The order of epoch ``e`` is ``torch.randperm`` from a ``torch.Generator`` seeded by
  ``(seed, e)``; sample ``i`` of epoch ``e`` draws its M captions (and its crop) from a generator
  seeded by ``(seed, e, i)``. Global batch ``b`` is positions ``[b*G, (b+1)*G)`` of the order, and
  rank ``r`` of ``W`` takes the ``r``-th contiguous slice of it, so what a step sees is a function of
  ``(seed, epoch, step)`` only: the same for any world size and any number of workers, and a resume
  at ``start_step`` skips whole batches without decoding them.
* a :class:`StreamDataset` (webdataset shards) yields raw samples from a shard list split by rank
  then worker; see ``compt.paradigms.clip.data.wds`` for what is and is not exact there.

This per-sample seeding is stronger than the per-rank/worker/epoch seeding the issue asks for; the
official code instead reseeds the global RNG, which yields only 4 possible caption subsets.

A bad sample (missing or corrupt image, empty caption, truncated shard) comes back as a
:class:`Skip`; the loader drops it from its batch, counts it by reason in ``loader.skips``, logs
``skipped N: reason=count, ...``, and raises :class:`DataError` once more than ``max_skips`` were
skipped in the epoch. A sample usable only after a repair (caption bytes that are not UTF-8, read
as U+FFFD) comes back :class:`Repaired`: it is kept and counted in ``loader.repairs``.

A batch whose samples are *all* bad would reach the model with 0 rows (open_clip cannot reshape an
empty batch, issue 11 item 9). It is refilled with the samples that follow it in the epoch order
(``refill_batch``): a function of (seed, epoch, step) like everything else, so a resumed run
refills identically; ``repairs["refilled_batch"]`` counts such batches. The borrowed samples are
counted where they belong, in their own batch, not twice.
"""

from __future__ import annotations

import abc
import logging
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "DataError",
    "Skip",
    "Repair",
    "Repaired",
    "Sample",
    "MapDataset",
    "StreamDataset",
    "Loader",
    "MapLoader",
    "sample_rng",
    "epoch_order",
    "format_skips",
    "pin_batches",
    "ignore_stop_signals",
]

log = logging.getLogger("compt.paradigms.clip.data")
_LOG_FIRST_SKIPS = 5  # skips logged one by one before only the summary is kept


class DataError(ValueError):
    """Bad data or data config: the message names the file/column/field and what to change."""


@dataclass(frozen=True)
class Skip:
    """A sample that could not be used: ``reason`` is the counter key, ``where`` a file or key."""

    reason: str
    where: str
    detail: str = ""


Sample = tuple[torch.Tensor, torch.Tensor]  # image [3, H, W] float32, tokens [M, L] int64


@dataclass(frozen=True)
class Repair:
    """A sample (or batch) used after a repair: ``reason`` is the counter key, ``where`` a file or key."""

    reason: str
    where: str
    detail: str = ""


@dataclass(frozen=True)
class Repaired:
    """What ``load`` returns for a sample it can use only after ``repair`` (kept, and counted)."""

    sample: Sample
    repair: Repair


@runtime_checkable
class MapDataset(Protocol):
    """Random-access dataset: ``load(i, rng)`` -> a :data:`Sample`, a :class:`Skip` or :class:`Repaired`."""

    def __len__(self) -> int: ...

    def load(self, index: int, rng: np.random.Generator) -> Sample | Skip | Repaired: ...


@runtime_checkable
class StreamDataset(Protocol):
    """Streaming dataset (``...data.wds``): ``num_samples`` per epoch; builds its own :class:`Loader`."""

    num_samples: int

    def make_loader(
        self,
        *,
        cfg,
        epoch: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        start_step: int,
        source: str,
    ) -> Loader: ...


def _mix(*parts: int) -> list[int]:
    # SeedSequence mixes the entropy words, so (seed, epoch, i) tuples never collide the way
    # seed + epoch + i would.
    return [int(p) & 0xFFFFFFFF for p in parts] + [int(p) >> 32 & 0xFFFFFFFF for p in parts]


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` in ``epoch``: its captions and crop come from here."""
    return np.random.default_rng(_mix(seed, epoch, index, 0x5A3E))


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation from a ``torch.Generator`` seeded by (seed, epoch)."""
    if not shuffle:
        return torch.arange(num_samples)
    state = np.random.SeedSequence(_mix(seed, epoch, 0x0DE5)).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return torch.randperm(num_samples, generator=gen)


def pin_batches(device: torch.device, workers: int) -> bool:
    """Whether batches are put in page-locked memory: when they go to a CUDA device from workers.

    The DataLoader's pin thread copies each batch into pinned memory while the step runs, and the
    trainer's ``non_blocking`` host-to-device copy then returns at once; from pageable memory that
    copy waits for the transfer. In-process loading (``workers=0``) keeps pageable batches: pinning
    there would be one more copy in the training thread (issue 17).
    """
    return device.type == "cuda" and workers > 0


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: workers leave SIGINT/SIGTERM to the training process.

    A Ctrl-C reaches the whole foreground process group and ``scancel`` every process of the job; a
    worker that died of it would make the next batch fail ("DataLoader worker exited unexpectedly")
    before the trainer could save at its step boundary (compt.engine.interrupt). The DataLoader
    ends its workers itself when the trainer exits.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def format_skips(skips: dict[str, int]) -> str:
    """``skipped N: reason=count, ...`` (the line logged and written to the metrics file)."""
    total = sum(skips.values())
    return f"skipped {total}: " + ", ".join(f"{k}={v}" for k, v in sorted(skips.items()))


Note = Skip | Repair  # what a batch reports besides its tensors


def sort_out(out: Sample | Skip | Repaired, good: list[Sample], notes: list[Note]) -> bool:
    """File one ``load``/``decode`` result: its sample into ``good``, its Skip/Repair into ``notes``.

    Returns True when the sample is usable.
    """
    if isinstance(out, Skip):
        notes.append(out)
        return False
    if isinstance(out, Repaired):
        notes.append(out.repair)
        out = out.sample
    good.append(out)
    return True


def refill_batch(
    following: Iterator[Sample | Skip | Repaired], local: int, max_scan: int, step: int
) -> tuple[list[Sample], list[Note]]:
    """Good samples for a batch whose own samples were all bad, taken in order from ``following``.

    Stops at ``local`` good samples, or after more than ``max_scan`` bad ones (then it returns none
    and the loader raises naming the step). The bad ones read here are not counted: they are
    counted in their own batch. Returns the samples and the ``refilled_batch`` repair note.
    """
    good: list[Sample] = []
    scanned = bad = 0
    for out in following:
        scanned += 1
        if not sort_out(out, good, []):
            bad += 1
        if len(good) == local or bad > max_scan:
            break
    if not good:
        return [], []
    detail = f"(every sample bad; {len(good)} taken from the {scanned} that follow)"
    return good, [Repair("refilled_batch", f"step {step}", detail)]


def collate(samples: list[Sample], image_size: int, num_captions: int, context_length: int) -> Sample:
    """Stack samples to ``[B, 3, H, W]`` and ``[B, M, L]`` (B may be 0 if all were skipped)."""
    if not samples:
        return (
            torch.zeros(0, 3, image_size, image_size),
            torch.zeros(0, num_captions, context_length, dtype=torch.long),
        )
    return torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])


class Loader(abc.ABC):
    """Iterable of ``(images, texts)`` per-rank batches with bad-sample accounting.

    ``len(loader)`` is the number of steps in a full epoch (drop_last), whatever ``start_step``;
    iterating yields the steps ``start_step .. len-1``. ``skips`` maps reason -> count so far.
    ``pin_memory`` (set by :func:`compt.paradigms.clip.data.build_loader`): workers hand over pinned batches.
    """

    pin_memory = False

    def __init__(self, *, steps: int, start_step: int, max_skips: int, source: str):
        if not 0 <= start_step <= steps:
            raise DataError(f"start_step={start_step} is outside the epoch's 0..{steps} steps")
        self.steps = steps
        self.start_step = start_step
        self.max_skips = max_skips
        self.source = source
        self.skips: dict[str, int] = {}
        self.repairs: dict[str, int] = {}  # reason -> samples (or batches) used after a repair
        self._logged_at = time.monotonic()

    def __len__(self) -> int:
        return self.steps

    def summary(self) -> str:
        """``skipped N: reason=count, ...`` for this loader so far (``skipped 0: `` if none)."""
        return format_skips(self.skips)

    def _count(self, notes: list[Note]) -> None:
        repairs = [n for n in notes if isinstance(n, Repair)]
        if repairs:
            counter = Counter(self.repairs)
            for r in repairs:
                counter[r.reason] += 1
                if sum(counter.values()) <= _LOG_FIRST_SKIPS:
                    log.warning("repaired (%s) %s %s", r.reason, r.where, r.detail)
            self.repairs = dict(counter)
        skipped = [n for n in notes if isinstance(n, Skip)]
        if not skipped:
            return
        counter = Counter(self.skips)
        for s in skipped:
            counter[s.reason] += 1
            if sum(counter.values()) <= _LOG_FIRST_SKIPS:
                log.warning("skipping bad sample (%s) %s %s", s.reason, s.where, s.detail)
        self.skips = dict(counter)
        total = sum(counter.values())
        if total > self.max_skips:
            last = skipped[-1]
            raise DataError(
                f"{self.source}: {format_skips(self.skips)} -- more than data.max_skips={self.max_skips}. "
                f"Last: {last.reason} at {last.where} {last.detail}. Fix or remove the bad files, "
                f"or raise data.max_skips."
            )

    def _deliver(self, batches) -> Iterator[Sample]:
        """Count each batch's skips; log the ``skipped N: ...`` line before the epoch's last batch.

        The summary goes out *before* the last batch is yielded because a trainer takes exactly
        ``len(loader)`` batches and never resumes the generator to see it end; it is also logged
        at most once a minute while skips accumulate, so a long epoch reports as it goes.
        """
        step = self.start_step
        for images, texts, notes in batches:
            before = sum(self.skips.values()) + sum(self.repairs.values())
            self._count(notes)
            if len(images) == 0:
                raise DataError(
                    f"{self.source}: step {step} has no usable sample: all of its own and up to "
                    f"data.max_skips={self.max_skips} that follow it are bad ({format_skips(self.skips)}). "
                    "Fix or remove the bad files."
                )
            step += 1
            now = time.monotonic()
            after = sum(self.skips.values()) + sum(self.repairs.values())
            if after and (step == self.steps or (after > before and now - self._logged_at > 60)):
                self._logged_at = now
                line = format_skips(self.skips)
                if self.repairs:
                    line += "; repaired " + ", ".join(f"{k}={v}" for k, v in sorted(self.repairs.items()))
                log.warning("%s: %s", self.source, line)
            yield images, texts

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Sample]:
        """The batches of steps ``start_step .. len-1`` (each kind of source yields its own way)."""


class _StepBatches(torch.utils.data.Dataset):
    """Map-style over steps: item ``s`` is rank ``r``'s slice of global batch ``s`` (for workers)."""

    def __init__(
        self,
        dataset: MapDataset,
        order: torch.Tensor,
        *,
        seed: int,
        epoch: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        collate_args: tuple[int, int, int],
        max_skips: int,
    ):
        self.dataset, self.order, self.seed, self.epoch = dataset, order, seed, epoch
        self.global_batch_size = global_batch_size
        self.local = global_batch_size // world_size
        self.rank = rank
        self.collate_args = collate_args
        self.max_skips = max_skips

    def __len__(self) -> int:
        return len(self.order) // self.global_batch_size

    def _load(self, position: int) -> Sample | Skip | Repaired:
        index = int(self.order[position % len(self.order)])
        return self.dataset.load(index, sample_rng(self.seed, self.epoch, index))

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, list[Note]]:
        lo = step * self.global_batch_size + self.rank * self.local
        good: list[Sample] = []
        notes: list[Note] = []
        for position in range(lo, lo + self.local):
            sort_out(self._load(position), good, notes)
        if not good:  # borrow the samples after this slice (wrapping around the epoch order)
            following = (self._load(p) for p in range(lo + self.local, lo + len(self.order)))
            good, refill = refill_batch(following, self.local, self.max_skips, step)
            notes += refill
        return (*collate(good, *self.collate_args), notes)


class MapLoader(Loader):
    """The loader of a :class:`MapDataset`: per-step slices, in-process or in DataLoader workers."""

    def __init__(
        self,
        dataset: MapDataset,
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        global_batch_size: int,
        rank: int,
        world_size: int,
        start_step: int,
        workers: int,
        max_skips: int,
        collate_args: tuple[int, int, int],
        source: str,
    ):
        n = len(dataset)
        if n < global_batch_size:
            raise DataError(
                f"{source}: {n} samples is fewer than one global batch of {global_batch_size}; "
                f"use more data (data.num_samples) or a smaller batch size"
            )
        super().__init__(
            steps=n // global_batch_size, start_step=start_step, max_skips=max_skips, source=source
        )
        order = epoch_order(n, seed, epoch, shuffle)
        self.batches = _StepBatches(
            dataset,
            order,
            seed=seed,
            epoch=epoch,
            global_batch_size=global_batch_size,
            rank=rank,
            world_size=world_size,
            collate_args=collate_args,
            max_skips=max_skips,
        )
        self.workers = workers

    def __iter__(self) -> Iterator[Sample]:
        steps = range(self.start_step, self.steps)
        if self.workers > 0 and len(steps) > 0:
            it = iter(
                torch.utils.data.DataLoader(
                    self.batches,
                    batch_size=None,
                    sampler=steps,
                    num_workers=self.workers,
                    collate_fn=_identity,
                    prefetch_factor=2,
                    pin_memory=self.pin_memory,
                    worker_init_fn=ignore_stop_signals,
                )
            )
        else:
            it = (self.batches[s] for s in steps)
        yield from self._deliver(it)


def _identity(x):
    return x
