"""Corpus readers: `--source` specs and the event stream (events.py) of each kind of source.

Readers run in the main process and only read and decode; wiki markup parsing, cleaning and
tokenization happen in the worker processes. Nothing here holds more than one document (or one
piece of a long text file) at a time.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import UserError

from .decoding import CountingDecoder, split_pieces
from .events import Doc, Event, Fix, Page, Skip
from .wikidump import is_wiki_dump, wiki_dump, wiki_page

READ_BLOCK = 1 << 20
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


def iter_source(src: SourceSpec) -> Iterator[Event]:
    if src.kind == "wikipedia":
        for path in _files(src.target, is_wiki_dump, "MediaWiki XML dump (.xml or .bz2)"):
            yield from wiki_dump(path)
    elif src.kind == "text":
        for path in _files(src.target, lambda p: p.suffix == ".txt", ".txt file"):
            yield from _text_file(path, src.target)
    elif src.kind == "jsonl":
        for path in _files(src.target, lambda p: p.suffix in (".jsonl", ".json"), ".jsonl file"):
            yield from _jsonl_file(path, src.target)
    else:
        yield from _hf_dataset(src)


def iter_documents(src: SourceSpec) -> Iterator[Doc | Skip | Fix]:
    """iter_source with dump pages parsed: Doc, Skip and Fix events only."""
    for ev in iter_source(src):
        if isinstance(ev, Page):
            yield from wiki_page(ev)
        else:
            yield ev


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


def _text_file(path: Path, root: str) -> Iterator[Event]:
    key = str(path.relative_to(root)) if Path(root).is_dir() else path.name
    dec = CountingDecoder()

    def pieces(f):
        rest = ""
        while True:
            block = f.read(READ_BLOCK)
            text = rest + dec.decode(block, final=not block)
            out, rest = split_pieces(text, tail=not block)
            yield from out
            if not block:
                return

    try:
        with open(path, "rb") as f:
            yield from _emit_pieces(key, pieces(f))
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from e
    yield from dec.fixes()


def _jsonl_file(path: Path, root: str) -> Iterator[Event]:
    name = str(path.relative_to(root)) if Path(root).is_dir() else path.name
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from e
    with f:
        for lineno, raw in enumerate(f, 1):
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
            key = f"{name}:{obj.get('id', lineno)}"
            pieces, _ = split_pieces(text, tail=True)
            yield from _emit_pieces(key, pieces)
            yield from dec.fixes()


# Datasets with one sentence per row: rows are joined into pseudo-documents (README explains).
SENTENCE_PER_ROW = {"bookcorpus", "bookcorpus/bookcorpus", "rojagtap/bookcorpus"}
ROWS_PER_PSEUDO_DOC = 512


def _hf_dataset(src: SourceSpec) -> Iterator[Event]:
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
        rows = iter(ds)
        first = next(rows, None)
    except Exception as e:  # datasets raises many types for "not found / offline / bad config"
        raise UserError(f"{src.spec}: cannot load the dataset ({type(e).__name__}: {e})") from e
    if first is None:
        raise UserError(f"{src.spec}: the dataset split {split!r} is empty")
    join = ROWS_PER_PSEUDO_DOC if name.lower() in SENTENCE_PER_ROW else 1

    def all_rows():
        yield first
        yield from rows

    buf: list[str] = []
    buf_start = 0
    for i, row in enumerate(all_rows()):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            yield Skip("missing_text")
            continue
        nul = "\x00" in text
        text = text.replace("\x00", "")
        if join == 1:
            pieces, _ = split_pieces(text, tail=True)
            yield from _emit_pieces(f"{src.spec}#{row.get('id', i)}", pieces)
            if nul:
                yield Fix("nul_bytes")
            continue
        if not buf:
            buf_start = i
        buf.append(text)
        if len(buf) == join:
            yield from _emit_pieces(f"{src.spec}#{buf_start}", [" ".join(buf)])
            buf = []
    if buf:
        yield from _emit_pieces(f"{src.spec}#{buf_start}", [" ".join(buf)])
