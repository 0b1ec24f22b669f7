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

Rows are OpenCLIP's rows. OpenCLIP reads the table with ``pandas.read_csv(path, sep=sep)``; the
index here is checked against pandas' C tokenizer on every table (the same number of records, or
an error), and a quote that opens a field and swallows the lines after it -- which both readers
accept, turning a 128-row table into 2 samples (issue 11 item 3) -- is an error naming the row.
Unlike OpenCLIP, rows with the wrong number of fields are counted skips (pandas would shift or
stop), empty cells are empty (pandas reads them, and the caption "NA", as NaN, trained as "nan"),
and caption bytes that are not UTF-8 are counted repairs.
"""

from __future__ import annotations

import array
import csv
import difflib
import io
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compt.engine.loader import DataError, Repair, Repaired, Skip
from compt.paradigms.clip.data.captions import caption_pool, sample_captions
from compt.paradigms.clip.data.images import (
    IMAGE_SUFFIXES,
    ImageError,
    eval_transform,
    open_image,
    train_transform,
)

__all__ = ["TableDataset", "TableIndex", "index_table"]

log = logging.getLogger("compt.paradigms.clip.data")
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long MLLM captions exceed the 128 KiB default


@dataclass(frozen=True)
class TableIndex:
    """Where a table's records are: header, start offsets (plus the end), and the lines they span."""

    header: list[str]
    offsets: np.ndarray  # int64 [rows + 1]: byte offset of each record, then of the end of the last
    complete: np.ndarray  # bool [rows]: the record has as many fields as the header
    lines: int  # non-blank lines after the header, up to the last record indexed


def _looks_like_row(line: str, separator: str, num_columns: int) -> bool:
    """True when ``line`` splits into a full table row that names an image (path or URL)."""
    fields = line.rstrip("\r\n").split(separator)
    if len(fields) != num_columns:
        return False
    return any(
        Path(f.strip().split("?")[0]).suffix.lower() in IMAGE_SUFFIXES
        or f.strip().startswith(("http://", "https://"))
        for f in fields
    )


def _check_swallowed(
    path: Path, lines: list[str], row: int, first_line: int, separator: str, num_columns: int
):
    """A record over several lines whose inner lines are rows themselves: a stray quote opened it."""
    for k, line in enumerate(lines[1:], 1):
        if _looks_like_row(line, separator, num_columns):
            raise DataError(
                f"{path}: data row {row} (line {first_line}) runs over lines {first_line}-"
                f"{first_line + len(lines) - 1}: a '\"' opens a quoted field there, and the lines inside "
                f"it are rows of their own (line {first_line + k}: {line.rstrip()[:80]!r}). A caption "
                "may not start with a bare quote: "
                'remove it, or quote the whole field and double the quotes inside (""); then rerun'
            )


def index_table(path: Path, separator: str, max_rows: int = 0) -> TableIndex:
    """Index the records of a table (``max_rows`` > 0 stops after that many data rows).

    csv.reader pulls one line at a time from the generator below, so when it returns a record the
    bytes (and lines) consumed so far end exactly at that record, even for quoted fields spanning
    lines. Raises :class:`DataError` for an unparsable header or a stray quote swallowing rows.
    """
    end, pending = 0, []

    def lines():
        nonlocal end
        with open(path, "rb") as f:
            for raw in f:
                end += len(raw)
                pending.append(raw.decode("utf-8", errors="replace"))
                yield pending[-1]

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
    line_no, nonblank = 1, 0
    pending.clear()
    # array, not list: 10M Python ints would hold ~300 MB while indexing a DreamLIP table.
    offsets, complete = array.array("q", [end]), array.array("b")
    try:
        for row in reader:
            n = len(pending)  # the lines of this record
            first_line, line_no = line_no + 1, line_no + n
            if n > 1:
                _check_swallowed(path, pending, len(complete) + 1, first_line, separator, len(header))
            pending.clear()
            if not row or (len(row) == 1 and not row[0].strip()):  # a blank line (pandas skips them too)
                offsets[-1] = end
                continue
            nonblank += n
            complete.append(len(row) == len(header))
            offsets.append(end)
            if len(complete) == max_rows:
                break
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV after data row {len(complete)}: {e}") from None
    return TableIndex(
        header,
        np.frombuffer(offsets, dtype=np.int64),
        np.frombuffer(complete, dtype=np.int8).astype(bool),
        nonblank,
    )


class _Head(io.RawIOBase):
    """The first ``size`` bytes of a file, as a readable stream (pandas reads what was indexed)."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(memoryview(buf)[: min(len(buf), self.left)])
        self.left -= n
        return n


def _pandas_rows(path: Path, separator: str, size: int) -> int:
    """Records of the first ``size`` bytes as OpenCLIP's reader (pandas' C tokenizer) splits them."""
    import pandas as pd

    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its field-count warnings: compt counts those rows itself
            chunks = pd.read_csv(
                io.BufferedReader(_Head(f, size)),
                sep=separator,
                dtype=str,
                keep_default_na=False,
                usecols=[0],  # count records, whatever their field count
                index_col=False,
                encoding_errors="replace",
                chunksize=1 << 16,
            )
            return sum(len(c) for c in chunks)
    except pd.errors.ParserError as e:
        raise DataError(
            f"{path}: OpenCLIP's reader (pandas.read_csv) cannot split it into rows: {e}. Usually a '\"' "
            "at the start of a caption opens a quoted field that never closes: remove it, or quote the "
            'whole field and double the quotes inside (""); then rerun'
        ) from None


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
        index = index_table(self.path, sep, cfg.num_samples)
        header, self.offsets, self.complete = index.header, index.offsets, index.complete
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"{self.path}: duplicate column name(s) {dup} in the header")
        self.img_col = _column(header, cfg.csv_img_key, "csv_img_key", self.path, sep)
        self.cap_col = _column(header, cfg.csv_caption_key, "csv_caption_key", self.path, sep)
        self.extra_cols = [
            _column(header, k, "csv_extra_caption_keys", self.path, sep) for k in cfg.csv_extra_caption_keys
        ]
        self.num_columns, self.separator, self.img_key = len(header), sep, cfg.csv_img_key
        self.root = Path(cfg.image_root) if cfg.image_root else self.path.parent
        self.count = len(self.complete)
        if self.count == 0:
            raise DataError(f"{self.path}: the table has a header but no data rows")
        theirs = _pandas_rows(self.path, sep, int(self.offsets[-1]))
        if theirs != self.count:
            raise DataError(
                f"{self.path}: compt's index has {self.count} rows but OpenCLIP's reader (pandas.read_csv) "
                f"{theirs}; please report this table (its first rows) as a compt bug"
            )
        # Rows read vs lines in the file: they differ only by quoted line breaks inside fields.
        inside = index.lines - self.count
        log.info(
            "%s: %d rows read from %d lines after the header%s",
            self.path,
            self.count,
            index.lines,
            f" ({inside} line breaks inside quoted fields)" if inside else "",
        )
        self.image_size, self.augment, self.tokenize = image_size, cfg.augment, tokenize
        self.num_captions, self.max_sub_captions = cfg.num_captions, cfg.max_sub_captions
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.count

    def _record(self, index: int) -> tuple[list[str], UnicodeDecodeError | None]:
        """The fields of data row ``index``, and the decode error if its bytes are not UTF-8."""
        # pread: no shared file position, so forked DataLoader workers can read concurrently.
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, stop = int(self.offsets[index]), int(self.offsets[index + 1])
        data, error = os.pread(self._fd, stop - start, start), None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:  # counted as a repair, not replaced silently (issue 11 item 8)
            text, error = data.decode("utf-8", errors="replace"), e
        return next(csv.reader(io.StringIO(text), delimiter=self.separator)), error

    def row(self, index: int) -> tuple[str, list[str]]:
        """(resolved image path, caption pool) of data row ``index`` (path "" when its cell is empty)."""
        fields, _ = self._record(index)
        return self._resolve(fields)

    def _resolve(self, fields: list[str]) -> tuple[str, list[str]]:
        cell = fields[self.img_col].strip()
        path = Path(cell)
        if cell and not path.is_absolute():
            path = self.root / path
        extra = [fields[c] for c in self.extra_cols]
        return (str(path) if cell else ""), caption_pool(fields[self.cap_col], extra, self.max_sub_captions)

    def load(self, index: int, rng: np.random.Generator):
        """Data row ``index`` as (image, M tokenized captions), a Skip, or Repaired (non-UTF-8 bytes)."""
        where = f"{self.path} data row {index + 1}"
        if not self.complete[index]:
            return Skip("bad_row", where, f"(not {self.num_columns} columns)")
        fields, error = self._record(index)
        path, pool = self._resolve(fields)
        if not path:  # Path("") is ".", which used to be reported as where='.' (issue 11 item 14)
            return Skip("empty_path", where, f"(column {self.img_key!r} is empty)")
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
        sample = image, self.tokenize(sample_captions(pool, self.num_captions, rng))
        if error is None:
            return sample
        return Repaired(
            sample,
            Repair("non_utf8_text", where, f"(bytes that are not UTF-8 read as U+FFFD: {error.reason})"),
        )
