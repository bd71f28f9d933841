"""The unit of parallel work: a chunk of reader events sent to a worker, and what comes back.

Chunk boundaries depend only on the sources (never on --workers or --task), so packing the
results in chunk order gives the same bytes however the chunks were computed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import numpy as np

from .events import Doc, Page, Skip, SourceCounts
from .sources import SourceSpec, iter_source

CHUNK_DOCS = 512
CHUNK_CHARS = 1 << 20


@dataclass
class Chunk:
    """Reader events for one worker call, all from one source."""
    index: int
    """Position in the build's chunk order (what the pack stage checkpoints and --task splits)."""
    source: int
    """Index of the source in --source order."""
    items: list[Doc | Page] = field(default_factory=list)
    """Document pieces and raw dump pages, in reading order."""
    counts: SourceCounts = field(default_factory=SourceCounts)
    """What the reader counted for these items (documents read, skips and repairs)."""


class Piece(NamedTuple):
    """One tokenized document piece, ready for SplitPacker.add."""
    validation: bool
    ids: np.ndarray
    first: bool
    last: bool


@dataclass
class ChunkResult:
    """A worker's output for one chunk; the array tasks save these for the merge (array.py: npz
    and JSON, checksummed)."""
    index: int
    source: int
    pieces: list[Piece]
    counts: SourceCounts
    """The chunk's counts plus what parsing its dump pages skipped or repaired."""


def iter_chunks(specs: list[SourceSpec]) -> Iterator[Chunk]:
    """Fixed-size chunks of reader events (document pieces, dump pages), each chunk from one
    source, with the reader's counts."""
    index = 0
    for s, spec in enumerate(specs):
        chunk, chars = Chunk(index, s), 0
        for ev in iter_source(spec):
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
                index += 1
                chunk, chars = Chunk(index, s), 0
        if chunk.items or not chunk.counts.empty():
            yield chunk
            index += 1
