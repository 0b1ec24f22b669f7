"""Caption pools and multi-caption sampling: the text augmentation of the baseline (§3.2, App. A).

The paper's baseline (LaCLIP + DreamLIP long captions) gives every image a pool of 16 texts: the raw
alt-text plus 15 sub-captions split from MLLM long captions (App. A), and every step draws M = 4 of
them (§3.2, Eq. 2-3). This module builds such pools from raw text (:func:`split_sentences`,
:func:`caption_pool`) and draws M captions from a pool with a generator it is given
(:func:`sample_captions`); the loader seeds that generator per (seed, epoch, sample index), never the
global RNG.

The sentence splitter is rule based and ships its rules (no nltk data to download): it splits on
``.``, ``!``, ``?``, newlines and ``</s>`` (the separators DreamLIP's MLLM captions contain), but not
after common abbreviations (``e.g.``, ``Mr.``, ``U.S.``), inside decimals (``3.5``) or initials.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["split_sentences", "caption_pool", "sample_captions", "parse_caption_cell"]

# Words whose trailing period does not end a sentence (lower case, without the final period).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf approx dept est fig no nos vol ca inc ltd co corp "
    "mt ft jan feb mar apr jun jul aug sep sept oct nov dec a.m p.m u.s u.k u.n d.c".split()
)
# A candidate boundary: terminal punctuation (possibly repeated, possibly closing quotes/brackets)
# followed by whitespace; or a hard separator (newline, </s>).
_BOUNDARY = re.compile(r"([.!?]+[\"')\]]*)(\s+)|\n+|</s>")
_WORD_BEFORE = re.compile(r"(\S+)$")


def _ends_with_abbreviation(text: str) -> bool:
    """True if ``text`` (which ends just before a period) ends with an abbreviation or an initial."""
    m = _WORD_BEFORE.search(text)
    if not m:
        return False
    word = m.group(1).lstrip("(\"'[").lower()
    # A single letter ("J. Smith", "U.S.") is an initial, not a sentence end.
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str, min_words: int = 2) -> list[str]:
    """Split ``text`` into sentences; fragments with fewer than ``min_words`` words are dropped.

    >>> split_sentences("A dog runs. It is brown, e.g. like a fox! Done")
    ['A dog runs.', 'It is brown, e.g. like a fox!']
    """
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        if m.group(1) is not None:
            punct = m.group(1)
            # "e.g. like" / "Dr. Smith": a period after an abbreviation is not a boundary.
            if punct.startswith(".") and len(punct.rstrip("\"')]")) == 1:
                if _ends_with_abbreviation(text[start : m.start()]):
                    continue
            end = m.start(2)
        else:
            end = m.start()
        sentences.append(text[start:end])
        start = m.end()
    sentences.append(text[start:])
    out = []
    for s in sentences:
        s = " ".join(s.split())  # collapse whitespace left by line breaks
        if len(s.split()) >= min_words:
            out.append(s)
    return out


def parse_caption_cell(cell: object) -> list[str]:
    """The texts in one caption field: a string, a JSON list given as a string, or a list.

    DreamLIP's files hold each MLLM caption either as a plain string (CSV) or as a one-element list
    (its webdataset json); both read the same here.
    """
    if cell is None:
        return []
    if isinstance(cell, (list, tuple)):
        return [str(c) for c in cell if c is not None and str(c).strip()]
    text = str(cell).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list):
            return [str(c) for c in items if c is not None and str(c).strip()]
    return [text] if text else []


def caption_pool(raw: str, extra: Iterable[object] = (), max_sub_captions: int = 15) -> list[str]:
    """The caption pool of one image: ``raw`` first, then up to ``max_sub_captions`` sub-captions.

    Each item of ``extra`` is one caption field (a short caption, or a long MLLM caption); long ones
    are split into sentences (one-word fragments dropped). Sub-captions are taken round-robin across
    the fields so that every captioner contributes (App. A keeps 15 per image), duplicates removed.
    ``max_sub_captions=0`` keeps them all. An empty ``raw`` is allowed if ``extra`` gives text (the
    pool is then all sub-captions); an empty pool is for the caller to treat as a bad sample.
    """
    raw = " ".join(str(raw or "").split())
    per_field = [[s for t in parse_caption_cell(cell) for s in split_sentences(t)] for cell in extra]
    seen = {raw.lower()} if raw else set()
    subs: list[str] = []
    limit = max_sub_captions if max_sub_captions > 0 else float("inf")
    depth = 0
    while len(subs) < limit and any(depth < len(f) for f in per_field):
        for field in per_field:
            if depth < len(field) and len(subs) < limit:
                key = field[depth].lower()
                if key not in seen:
                    seen.add(key)
                    subs.append(field[depth])
        depth += 1
    return ([raw] if raw else []) + subs


def sample_captions(pool: Sequence[str], num: int, rng: np.random.Generator) -> list[str]:
    """Draw ``num`` captions from ``pool`` with ``rng`` (§3.2: M of the 16 texts per step).

    Without replacement when the pool is large enough; otherwise the whole pool once plus random
    repeats, so no caption repeats more than it must (as DreamLIP's sampler).
    """
    n = len(pool)
    if n == 0:
        raise ValueError("cannot sample captions from an empty pool")
    if n >= num:
        return [pool[i] for i in rng.choice(n, size=num, replace=False)]
    picks = list(range(n)) + list(rng.integers(0, n, size=num - n))
    order = rng.permutation(num)
    return [pool[picks[i]] for i in order]
