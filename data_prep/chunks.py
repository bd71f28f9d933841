"""What a worker makes of a unit (units.py): the unit's reader events cut into chunks of bounded
size (each cleaned and tokenized in one batch), and the unit's result.

Chunking happens inside a unit and does not change the result; units, not chunks, are what the
pack stage checkpoints and the array tasks share out.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from .events import Doc, Event, Page, Skip, SourceCounts

CHUNK_DOCS = 512
CHUNK_CHARS = 1 << 20


@dataclass
class Chunk:
    """Reader events for one cleaning and tokenizing batch."""
    items: list[Doc | Page] = field(default_factory=list)
    """Document pieces and raw dump pages, in reading order."""
    counts: SourceCounts = field(default_factory=SourceCounts)
    """What the reader counted for these items (documents read, skips and repairs)."""


class Piece(NamedTuple):
    """One tokenized document piece, ready for SplitPacker.add."""
    doc: int
    """The document's hash (split.doc_hash): the pack stage's split decision."""
    ids: np.ndarray
    first: bool
    last: bool


@dataclass
class UnitResult:
    """A worker's output for one unit; the array tasks save these for the merge (array.py: npz
    and JSON, checksummed)."""
    index: int
    source: int
    pieces: list[Piece]
    counts: SourceCounts
    """The reader's counts plus what parsing the unit's dump pages skipped or repaired."""
    bytes_read: int = 0
    """Bytes the unit's reader took from disk (compressed bytes for a .bz2)."""


def iter_chunks(events: Iterable[Event]) -> Iterator[Chunk]:
    """The events cut into chunks of at most CHUNK_DOCS items or about CHUNK_CHARS characters,
    with the reader's counts."""
    chunk, chars = Chunk(), 0
    for ev in events:
        if isinstance(ev, Doc):
            chunk.items.append(ev)
            chars += len(ev.text)
            if ev.first:
                chunk.counts.documents_read += 1
        elif isinstance(ev, Page):
            chunk.items.append(ev)
            chars += len(ev.xml)
            chunk.counts.documents_read += 1
        else:
            if isinstance(ev, Skip):  # a document read and dropped
                chunk.counts.documents_read += 1
            chunk.counts.count(ev)
        if len(chunk.items) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield chunk
            chunk, chars = Chunk(), 0
    if chunk.items or not chunk.counts.empty():
        yield chunk
