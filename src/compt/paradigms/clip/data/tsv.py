"""CSV/TSV image-caption tables, OpenCLIP-compatible, with DreamLIP long-caption columns (§4, App. A).

OpenCLIP's ``--dataset-type csv`` reads a table with an image-path column (``--csv-img-key``,
default ``filepath``) and a caption column (``--csv-caption-key``, default ``title``) separated by
``--csv-separator`` (default tab). The same options are ``data.csv_img_key``, ``data.csv_caption_key``
and ``data.csv_separator`` here. The paper's data adds DreamLIP's MLLM captions per image (raw +
short + long captions of InstructBLIP, ShareGPT4V, LLaVA-1.5); name those columns in
``data.csv_extra_caption_keys`` and each image gets a pool of its raw caption plus up to
``data.max_sub_captions`` (15) sentences split from them, of which M are drawn per step (§3.2).

The table is indexed once (byte offset of every record, quoted multi-line fields included) and
records are parsed when loaded, so a 10M-row DreamLIP table costs 80 MB of offsets, not its text.
"""

from __future__ import annotations

import array
import csv
import difflib
import io
import os
import sys
from pathlib import Path

import numpy as np

from compt.engine.loader import DataError, Skip
from compt.paradigms.clip.data.captions import caption_pool, sample_captions
from compt.paradigms.clip.data.images import ImageError, eval_transform, open_image, train_transform

__all__ = ["TableDataset", "index_table"]

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long MLLM captions exceed the 128 KiB default


def index_table(path: Path, separator: str, max_rows: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Header, record start offsets (one extra: the end) and a bool per record: has every column.

    ``max_rows`` > 0 stops after that many data rows.

    csv.reader pulls one line at a time from the generator below, so when it returns a record the
    bytes consumed so far end exactly at that record, even for quoted fields spanning lines.
    """
    end = 0

    def lines():
        nonlocal end
        with open(path, "rb") as f:
            for raw in f:
                end += len(raw)
                yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(lines(), delimiter=separator)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header row naming the columns") from None
    except csv.Error as e:
        raise DataError(f"{path}: cannot parse the header: {e}") from None
    if header and header[0].startswith("\ufeff"):  # a UTF-8 byte-order mark
        header[0] = header[0][1:]
    header = [h.strip() for h in header]
    # array, not list: 10M Python ints would hold ~300 MB while indexing a DreamLIP table.
    offsets, complete = array.array("q", [end]), array.array("b")
    try:
        for row in reader:
            if not row:  # blank line
                offsets[-1] = end
                continue
            complete.append(len(row) == len(header))
            offsets.append(end)
            if len(complete) == max_rows:
                break
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV after data row {len(complete)}: {e}") from None
    return header, np.frombuffer(offsets, dtype=np.int64), np.frombuffer(complete, dtype=np.int8).astype(bool)


def _column(header: list[str], key: str, option: str, path: Path, separator: str) -> int:
    """Index of column ``key``, or a DataError naming the file, the column and the option to set."""
    if key in header:
        return header.index(key)
    msg = f"{path}: no column {key!r} (set by data.{option}); the header has {header}"
    close = difflib.get_close_matches(key, header, n=1)
    if close:
        msg += f"; did you mean {close[0]!r}?"
    if len(header) == 1:
        others = [
            name for s, name in ((",", "comma"), ("\t", "tab"), (";", "';'"), ("|", "'|'")) if s in header[0]
        ]
        if others and separator not in header[0]:
            msg += (
                f"; the header did not split with data.csv_separator={separator!r} but contains a "
                f"{others[0]}: set data.csv_separator to it"
            )
    raise DataError(msg)


class TableDataset:
    """Rows of an image-caption table; ``load(i, rng)`` -> (image, M tokenized captions) or Skip."""

    def __init__(self, cfg, *, image_size: int, tokenize):
        if not cfg.path:
            raise DataError("data.path is empty: set it to the CSV/TSV table (data.path=train.tsv)")
        self.path = Path(cfg.path)
        if not self.path.is_file():
            raise DataError(f"data.path {self.path} does not exist (expected a CSV/TSV table)")
        sep = cfg.csv_separator
        header, self.offsets, self.complete = index_table(self.path, sep, cfg.num_samples)
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"{self.path}: duplicate column name(s) {dup} in the header")
        self.img_col = _column(header, cfg.csv_img_key, "csv_img_key", self.path, sep)
        self.cap_col = _column(header, cfg.csv_caption_key, "csv_caption_key", self.path, sep)
        self.extra_cols = [
            _column(header, k, "csv_extra_caption_keys", self.path, sep) for k in cfg.csv_extra_caption_keys
        ]
        self.num_columns, self.separator = len(header), sep
        self.root = Path(cfg.image_root) if cfg.image_root else self.path.parent
        self.count = len(self.complete)
        if self.count == 0:
            raise DataError(f"{self.path}: the table has a header but no data rows")
        self.image_size, self.augment, self.tokenize = image_size, cfg.augment, tokenize
        self.num_captions, self.max_sub_captions = cfg.num_captions, cfg.max_sub_captions
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.count

    def _record(self, index: int) -> list[str]:
        # pread: no shared file position, so forked DataLoader workers can read concurrently.
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        text = os.pread(self._fd, stop - start, start).decode("utf-8", errors="replace")
        return next(csv.reader(io.StringIO(text), delimiter=self.separator))

    def row(self, index: int) -> tuple[str, list[str]]:
        """(resolved image path, caption pool) of data row ``index``."""
        fields = self._record(index)
        path = Path(fields[self.img_col].strip())
        if not path.is_absolute():
            path = self.root / path
        extra = [fields[c] for c in self.extra_cols]
        return str(path), caption_pool(fields[self.cap_col], extra, self.max_sub_captions)

    def load(self, index: int, rng: np.random.Generator):
        where = f"{self.path} data row {index + 1}"
        if not self.complete[index]:
            return Skip("bad_row", where, f"(not {self.num_columns} columns)")
        path, pool = self.row(index)
        if not pool:
            return Skip("empty_caption", where)
        try:
            img = open_image(path, draft_size=self.image_size)
        except ImageError as e:
            return Skip(e.reason, path, str(e))
        if self.augment:
            image = train_transform(img, self.image_size, rng)
        else:
            image = eval_transform(img, self.image_size)
        return image, self.tokenize(sample_captions(pool, self.num_captions, rng))
