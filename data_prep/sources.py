"""Corpus readers: `--source` specs, their units of work (units.py), and the event stream
(events.py) of each unit.

Readers run in the worker processes, one unit each, and only read and decode; wiki markup
parsing, cleaning and tokenization follow in the same worker. Nothing here holds more than one
document (or one piece of a long text file) at a time.
"""
from __future__ import annotations

import codecs
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import UserError

from .decoding import CountingDecoder, split_pieces
from .events import Doc, Event, Fix, Page, Skip
from .units import (Meter, Unit, bz2_lines, byte_blocks, group_streams, index_offsets, line_range,
                    open_metered, streams_begin_in)
from .wikidump import dump_header, is_wiki_dump, wiki_dump, wiki_page, wiki_pages

KINDS = ("wikipedia", "text", "jsonl", "hf")


@dataclass(frozen=True)
class SourceSpec:
    spec: str  # as given to --source
    kind: str  # one of KINDS
    target: str  # the path, or the Hugging Face dataset NAME[:CONFIG][@SPLIT]


def parse_spec(spec: str) -> SourceSpec:
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS or not target:
        raise UserError(f"--source {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}")
    return SourceSpec(spec, kind, target)


def plan_units(specs: list[SourceSpec], unit_bytes: int) -> list[Unit]:
    """Every unit of the build, in reading order (units.py says what a unit is for each input)."""
    units: list[Unit] = []
    for s, spec in enumerate(specs):
        if spec.kind == "hf":
            n = hf_dataset(spec, check=True)[0].num_shards
            units += [Unit(len(units) + k, s, spec.target, "shard", part=k, parts=n) for k in range(n)]
            continue
        for path in source_files(spec):
            mine = _file_units(spec.kind, path, unit_bytes)
            units += [Unit(len(units) + k, s, str(path), kind, a, b, k, len(mine), non_prose)
                      for k, (kind, a, b, non_prose) in enumerate(mine)]
    return units


def _file_units(kind: str, path: Path, unit_bytes: int) -> list[tuple[str, int, int, tuple[str, ...]]]:
    """(kind, start, end, non_prose) of each unit of one file."""
    size = path.stat().st_size
    if kind == "wikipedia":
        if not path.name.endswith(".bz2"):
            return [("file", 0, size, ())]
        non_prose = dump_header(path)
        offsets = index_offsets(path, size)
        if offsets is not None:
            return [("streams", a, b, non_prose) for a, b in group_streams(offsets, size, unit_bytes)]
        if size <= unit_bytes or not streams_begin_in(path, 1, unit_bytes):
            return [("file", 0, size, ())]  # small, or a single stream: read whole
        return [("scan", a, min(a + unit_bytes, size), non_prose) for a in range(0, size, unit_bytes)]
    if size <= unit_bytes or (kind == "text" and _wide_encoding(path)):
        return [("file", 0, size, ())]
    return [("lines", a, min(a + unit_bytes, size), ()) for a in range(0, size, unit_bytes)]


def _wide_encoding(path: Path) -> bool:
    """UTF-16 or UTF-32 (by its BOM): its lines cannot be found by their b"\\n" bytes."""
    with open(path, "rb") as f:
        return f.read(2) in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # UTF-32's BOMs begin so too


def read_unit(unit: Unit, spec: SourceSpec, meter: Meter) -> Iterator[Event]:
    """The events of one unit, in reading order; meter counts the bytes read from disk."""
    path = Path(unit.path)
    if spec.kind == "hf":
        yield from _hf_shard(spec, unit)
    elif spec.kind == "wikipedia":
        if unit.kind == "file":
            yield from wiki_dump(open_metered(path, meter), path)
        else:
            yield from wiki_pages(bz2_lines(path, unit, meter), path, unit.non_prose)
    else:
        a, b = (unit.start, unit.end) if unit.kind == "file" else line_range(path, unit, meter)
        blocks = byte_blocks(path, a, b, meter)
        if spec.kind == "text":
            yield from _text(_key(path, spec.target), blocks, unit.part == 0, unit.part == unit.parts - 1)
        else:
            yield from _jsonl(_key(path, spec.target), blocks, a)


def iter_source(spec: SourceSpec, unit_bytes: int = 1 << 62) -> Iterator[Event]:
    """A whole source's events, read here unit after unit."""
    for unit in plan_units([spec], unit_bytes):
        yield from read_unit(unit, spec, Meter())


def iter_documents(src: SourceSpec) -> Iterator[Doc | Skip | Fix]:
    """iter_source with dump pages parsed: Doc, Skip and Fix events only."""
    for ev in iter_source(src):
        if isinstance(ev, Page):
            yield from wiki_page(ev)
        else:
            yield ev


def source_files(src: SourceSpec) -> list[Path]:
    """The files of a wikipedia, text or jsonl source, in order."""
    if src.kind == "wikipedia":
        return _files(src.target, is_wiki_dump, "MediaWiki XML dump (.xml or .bz2)")
    if src.kind == "text":
        return _files(src.target, lambda p: p.suffix == ".txt", ".txt file")
    return _files(src.target, lambda p: p.suffix in (".jsonl", ".json"), ".jsonl file")


def _key(path: Path, root: str) -> str:
    return str(path.relative_to(root)) if Path(root).is_dir() else path.name


def _files(target: str, accept, what: str) -> list[Path]:
    root = Path(target)
    if not root.exists():
        raise UserError(f"{root}: no such file or directory")
    if root.is_file():
        if not os.access(root, os.R_OK):
            raise UserError(f"{root}: not readable (permission denied)")
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if accept(Path(f)))
    if not found:
        raise UserError(f"{root}: directory holds no {what}")
    for p in found:
        if not os.access(p, os.R_OK):
            raise UserError(f"{p}: not readable (permission denied)")
    return found


def _emit_pieces(key: str, pieces: Iterable[str]) -> Iterator[Doc | Skip]:
    """Doc events for non-blank pieces; an empty document is a skip."""
    pending = None
    for piece in pieces:
        if not piece.strip():
            continue
        if pending is not None:
            yield Doc(key, pending[0], pending[1], False)
            pending = (piece, False)
        else:
            pending = (piece, True)
    if pending is None:
        yield Skip("empty")
    else:
        yield Doc(key, pending[0], pending[1], True)


def _text(key: str, blocks: Iterable[bytes], first: bool, last: bool) -> Iterator[Event]:
    """A text file, or a range of its lines: one document. A file read in ranges marks the
    document's start and end with empty pieces (its first and last range), so the packer joins
    the ranges' pieces, in unit order, into one document exactly as a whole read would."""
    dec = CountingDecoder(bom=first)

    def pieces():
        rest = ""
        for block in blocks:
            out, rest = split_pieces(rest + dec.decode(block), tail=False)
            yield from out
        yield from split_pieces(rest + dec.decode(b"", final=True), tail=True)[0]

    if first and last:
        yield from _emit_pieces(key, pieces())
    else:
        if first:
            yield Doc(key, "", True, False)
        yield from (Doc(key, p, False, False) for p in pieces() if p.strip())
        if last:
            yield Doc(key, "", False, True)
    yield from dec.fixes()


def _lines(blocks: Iterable[bytes], offset: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, line without its newline) of the lines in blocks, which begin at offset."""
    buf = bytearray()
    for block in blocks:
        buf += block
        end = buf.rfind(b"\n")
        if end < 0:
            continue
        for line in bytes(buf[:end]).split(b"\n"):
            yield offset, line
            offset += len(line) + 1
        del buf[:end + 1]
    if buf:
        yield offset, bytes(buf)


def _jsonl(name: str, blocks: Iterable[bytes], offset: int) -> Iterator[Event]:
    """JSON lines: a document per line with a "text" string; its key is NAME:ID, or NAME:@OFFSET
    (the line's byte offset: known to a unit that begins mid-file, unlike its line number)."""
    for pos, raw in _lines(blocks, offset):
        if not raw.strip():
            continue
        dec = CountingDecoder()
        line = dec.decode(raw, final=True)
        try:
            obj = json.loads(line)
        except ValueError:
            yield Skip("invalid_json")
            continue
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            yield Skip("missing_text")
            continue
        if "\x00" in text:
            dec.nul += text.count("\x00")
            text = text.replace("\x00", "")
        key = f"{name}:{obj['id']}" if "id" in obj else f"{name}:@{pos}"
        pieces, _ = split_pieces(text, tail=True)
        yield from _emit_pieces(key, pieces)
        yield from dec.fixes()


# Datasets with one sentence per row: rows are joined into pseudo-documents (README explains).
SENTENCE_PER_ROW = {"bookcorpus", "bookcorpus/bookcorpus", "rojagtap/bookcorpus"}
ROWS_PER_PSEUDO_DOC = 512


def hf_dataset(src: SourceSpec, check: bool = False):
    """The streaming dataset of an hf: source and its name; UserError naming the source if it
    cannot be loaded or (with check, when the units are planned: it reads a row) is empty."""
    import datasets  # seconds to import, and only this kind of source needs it

    target = src.target
    split = "train"
    if "@" in target:
        target, split = target.rsplit("@", 1)
    name, config = target, None
    if ":" in target and not Path(target).exists():
        name, config = target.split(":", 1)
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        first = next(iter(ds), None) if check else {}
    except Exception as e:  # datasets raises many types for "not found / offline / bad config"
        raise UserError(f"{src.spec}: cannot load the dataset ({type(e).__name__}: {e})") from e
    if first is None:
        raise UserError(f"{src.spec}: the dataset split {split!r} is empty")
    return ds, name


def _hf_shard(src: SourceSpec, unit: Unit) -> Iterator[Event]:
    """One shard of an hf: dataset; a row's key is SPEC#ID, or SPEC#SHARD:ROW."""
    ds, name = hf_dataset(src)
    rows = ds.shard(unit.parts, unit.part) if unit.parts > 1 else ds
    join = ROWS_PER_PSEUDO_DOC if name.lower() in SENTENCE_PER_ROW else 1
    buf: list[str] = []
    buf_start = 0
    for i, row in enumerate(rows):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            yield Skip("missing_text")
            continue
        nul = "\x00" in text
        text = text.replace("\x00", "")
        if join == 1:
            pieces, _ = split_pieces(text, tail=True)
            yield from _emit_pieces(f"{src.spec}#{row['id'] if 'id' in row else f'{unit.part}:{i}'}", pieces)
            if nul:
                yield Fix("nul_bytes")
            continue
        if not buf:
            buf_start = i
        buf.append(text)
        if len(buf) == join:
            yield from _emit_pieces(f"{src.spec}#{unit.part}:{buf_start}", [" ".join(buf)])
            buf = []
    if buf:
        yield from _emit_pieces(f"{src.spec}#{unit.part}:{buf_start}", [" ".join(buf)])
