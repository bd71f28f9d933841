"""Units of work: pieces of the input that one worker reads, decompresses, splits, cleans and
tokenizes on its own, so that no single process reads the whole corpus.

Units are defined from the input and --unit-mb alone (never from --workers or --task), and their
results are packed in unit order: the documents reach the packer in the order a sequential read
gives, so the bytes are the same for any number of workers or array tasks.

  input                                      unit
  a file up to --unit-mb, any kind           the whole file
  a multistream .bz2 dump with its index     consecutive whole bz2 streams, about --unit-mb
    (NAME-multistream-index.txt.bz2)         (the index gives each stream's offset)
  a .bz2 dump without an index               the streams that begin in a byte range (found by
                                             their magic); a .bz2 with no second stream in its
                                             first --unit-mb (a single-stream file) is one unit
  a large .txt or .jsonl file (UTF-8)        the lines that begin in a byte range; a text
                                             file's ranges stay one document, in order
  an hf: dataset                             one of its shards (a parquet or arrow file)
A plain .xml dump and a UTF-16/32 text file are read whole (one unit per file).
"""
from __future__ import annotations

import bz2
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

READ_BLOCK = 1 << 14  # small: a unit that begins mid-file reads little beyond its range
# A bz2 stream begins "BZh" + block size digit, then a block's magic (pi) or, for an empty
# stream, the end-of-stream magic (sqrt pi): 80 fixed bits, so a match inside compressed data
# has odds of about 2^-80 per byte (and would fail to decompress, loudly, if it happened).
STREAM_START = re.compile(rb"BZh[1-9](?:1AY&SY|\x17rE8P\x90)")
MAGIC_LEN = 10


@dataclass(frozen=True)
class Unit:
    index: int
    """Position in the build's unit order (what the pack stage checkpoints and --task splits)."""
    source: int
    """Index of the source in --source order."""
    path: str
    """The file (for kind "shard", the --source target)."""
    kind: str
    """"file" (the whole file), "streams" (bz2 streams from `start` exactly), "scan" (bz2 streams
    beginning in [start, end)), "lines" (lines beginning in [start, end)), "shard"."""
    start: int = 0
    end: int = 0
    part: int = 0
    """The unit's position among its file's (or dataset's) units."""
    parts: int = 1
    non_prose: tuple[str, ...] = ()
    """For a dump: its localized File and Category namespace names (from its header)."""


class Meter:
    """Bytes a unit's reader took from disk (compressed bytes for a .bz2)."""

    def __init__(self):
        self.bytes = 0


class _MeteredRaw(io.RawIOBase):
    def __init__(self, f, meter: Meter):
        self.f, self.meter = f, meter

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.meter.bytes += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def open_metered(path: Path | str, meter: Meter) -> io.BufferedReader:
    """A buffered binary file whose reads are counted in meter."""
    try:
        return io.BufferedReader(_MeteredRaw(open(path, "rb", buffering=0), meter), READ_BLOCK)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from e


# Wikimedia's names: NAME-multistream.xml.bz2 and its NAME-multistream-index.txt.bz2, or a part,
# NAME-multistream3.xml-p151574p311329.bz2 and NAME-multistream-index3.txt-p151574p311329.bz2.
MULTISTREAM_NAME = re.compile(r"(.*)-multistream(\d*)\.xml(-p\d+p\d+)?\.bz2")


def index_path(dump: Path) -> Path | None:
    """Wikimedia's index beside a multistream dump (or part), or None for another name."""
    m = MULTISTREAM_NAME.fullmatch(dump.name)
    if m is None:
        return None
    return dump.with_name(f"{m[1]}-multistream-index{m[2]}.txt{m[3] or ''}.bz2")


def index_offsets(dump: Path, size: int) -> list[int] | None:
    """The stream offsets an index gives (0, the header's stream, included), or None without one.
    Lines are OFFSET:PAGE_ID:TITLE; a title may hold colons."""
    index = index_path(dump)
    if index is None or not index.exists():
        return None
    offsets = {0}
    try:
        with bz2.open(index, "rb") as f:
            for lineno, line in enumerate(f, 1):
                head = line.split(b":", 1)[0]
                if not head.strip():
                    continue
                if not head.isdigit() or not 0 < int(head) < size:
                    raise UserError(f"{index}: line {lineno} is not OFFSET:PAGE_ID:TITLE with an "
                                    f"offset inside {dump.name} ({size} bytes)")
                offsets.add(int(head))
    except (OSError, EOFError) as e:
        raise UserError(f"{index}: not a readable bz2 index ({e})") from e
    return sorted(offsets)


def group_streams(offsets: list[int], size: int, unit_bytes: int) -> Iterator[tuple[int, int]]:
    """Consecutive streams in groups of about unit_bytes."""
    start = 0
    for off in offsets[1:]:
        if off - start >= unit_bytes:
            yield start, off
            start = off
    yield start, size


# -- reading a unit's bytes

def bz2_lines(path: Path, unit: Unit, meter: Meter) -> Iterator[bytes]:
    """The decompressed lines of the bz2 streams a "streams" or "scan" unit owns: those that begin
    in [start, end) (a "streams" unit's first one exactly at start), each read to its end."""
    with open_metered(path, meter) as f:
        pos, buf = unit.start, b""  # buf: compressed bytes read and not yet decompressed, from pos
        f.seek(pos)
        if unit.kind == "scan" and unit.start > 0:
            pos, buf = _next_stream(f, unit.start, unit.end)
            if pos is None:
                return  # no stream begins in this range (a single-stream file, or big streams)
        rest = b""  # the start of a line not yet ended
        while pos < unit.end:
            if len(buf) < MAGIC_LEN:
                buf += f.read(READ_BLOCK)
            if not buf:
                break
            if STREAM_START.match(buf) is None:
                raise UserError(f"{path}: no bz2 stream begins at byte {pos}"
                                + (" (does the index belong to this dump?)" if unit.kind == "streams" else ""))
            dec = bz2.BZ2Decompressor()
            while not dec.eof:
                if not buf:
                    buf = f.read(READ_BLOCK)
                    if not buf:
                        raise UserError(f"{path}: truncated compressed file (a bz2 stream that "
                                        f"begins at byte {pos} has no end)")
                try:
                    data = dec.decompress(buf)
                except OSError as e:
                    raise UserError(f"{path}: corrupt bz2 stream near byte {pos} ({e})") from e
                pos += len(buf) - len(dec.unused_data) if dec.eof else len(buf)
                buf = dec.unused_data if dec.eof else b""
                lines = (rest + data).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    yield line + b"\n"
        if rest:
            yield rest


def _next_stream(f, start: int, end: int) -> tuple[int | None, bytes]:
    """The offset of the first bz2 stream beginning in [start, end) (None if none) and the bytes
    read from there on; f is left after them."""
    pos = start
    while pos < end:
        f.seek(pos)
        block = f.read(READ_BLOCK + MAGIC_LEN)
        m = STREAM_START.search(block)
        if m is not None:
            return (pos + m.start(), block[m.start():]) if pos + m.start() < end else (None, b"")
        if len(block) <= MAGIC_LEN:
            break
        pos += len(block) - MAGIC_LEN  # a magic cut by the block's end is found in the next
    return None, b""


def streams_begin_in(path: Path, start: int, end: int) -> bool:
    """Whether a bz2 stream begins in [start, end) (a multistream file, when start > 0)."""
    with open_metered(path, Meter()) as f:
        return _next_stream(f, start, end)[0] is not None


def line_range(path: Path, unit: Unit, meter: Meter) -> tuple[int, int]:
    """The bytes [a, b) of the lines that begin in [unit.start, unit.end)."""
    with open_metered(path, meter) as f:
        return _line_start(f, unit.start), _line_start(f, unit.end)


def _line_start(f, pos: int) -> int:
    """The first line start at or after pos."""
    if pos == 0:
        return 0
    f.seek(pos - 1)
    while True:
        block = f.read(READ_BLOCK)
        if not block:
            return f.tell()
        i = block.find(b"\n")
        if i >= 0:
            return f.tell() - len(block) + i + 1


def byte_blocks(path: Path, start: int, end: int, meter: Meter) -> Iterator[bytes]:
    with open_metered(path, meter) as f:
        f.seek(start)
        left = end - start
        while left > 0:
            block = f.read(min(READ_BLOCK, left))
            if not block:
                return
            left -= len(block)
            yield block
