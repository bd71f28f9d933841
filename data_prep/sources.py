"""Corpus readers. Each source streams events in a deterministic order:

    ("doc", key, text, first, last, wiki)  a piece of a document (long documents come in pieces);
                                           wiki: None, or the dump's non-prose namespace names
                                           when the text is wiki markup still to be cleaned
    ("skip", reason)                  a document that was read and dropped
    ("fix", reason)                   the document being read was repaired (decoding, NUL bytes)
    ("page", dump, xml, non_prose)    one raw <page> block of a MediaWiki dump: wiki_page turns it
                                      into the events above (in a worker)

Readers run in the main process and only read and decode; wiki markup cleaning and tokenization
happen in the worker processes. Nothing here holds more than one document (or one piece of a
long text file) at a time.
"""
from __future__ import annotations

import bz2
import codecs
import io
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PIECE_CHARS = 1 << 20  # long documents are cut into ~1 MB pieces, at whitespace
READ_BLOCK = 1 << 20


class DataPrepError(Exception):
    """Unrecoverable input: the message names the file and the problem."""


@dataclass(frozen=True)
class SourceSpec:
    spec: str
    kind: str  # wikipedia | text | jsonl | hf
    target: str

    @property
    def needs_wiki_cleaning(self) -> bool:
        return self.kind == "wikipedia"


KINDS = ("wikipedia", "text", "jsonl", "hf")


def parse_spec(spec: str) -> SourceSpec:
    kind, sep, target = spec.partition(":")
    if not sep or kind not in KINDS or not target:
        raise DataPrepError(f"--source {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}")
    return SourceSpec(spec, kind, target)


def iter_source(src: SourceSpec) -> Iterator[tuple]:
    if src.kind == "wikipedia":
        for path in _files(src.target, _is_wiki_dump, "MediaWiki XML dump (.xml or .bz2)"):
            yield from _wiki_dump(path)
    elif src.kind == "text":
        for path in _files(src.target, lambda p: p.suffix == ".txt", ".txt file"):
            yield from _text_file(path, src.target)
    elif src.kind == "jsonl":
        for path in _files(src.target, lambda p: p.suffix in (".jsonl", ".json"), ".jsonl file"):
            yield from _jsonl_file(path, src.target)
    else:
        yield from _hf_dataset(src)


def iter_documents(src: SourceSpec) -> Iterator[tuple]:
    """iter_source with dump pages parsed: doc, skip and fix events only."""
    for ev in iter_source(src):
        if ev[0] == "page":
            yield from wiki_page(*ev[1:])
        else:
            yield ev


def _is_wiki_dump(p: Path) -> bool:
    name = p.name
    return ".xml" in name and (name.endswith(".bz2") or name.endswith(".xml")) and "-index" not in name


def _files(target: str, accept, what: str) -> list[Path]:
    root = Path(target)
    if not root.exists():
        raise DataPrepError(f"{root}: no such file or directory")
    if root.is_file():
        if not os.access(root, os.R_OK):
            raise DataPrepError(f"{root}: not readable (permission denied)")
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in sorted(filenames) if accept(Path(f)))
    if not found:
        raise DataPrepError(f"{root}: directory holds no {what}")
    for p in found:
        if not os.access(p, os.R_OK):
            raise DataPrepError(f"{p}: not readable (permission denied)")
    return found


class CountingDecoder:
    """UTF-8 (or the BOM's encoding) decoded incrementally; invalid bytes become U+FFFD and are
    counted, NUL characters are dropped and counted."""

    def __init__(self):
        self.decoder = None
        self.invalid = 0
        self.nul = 0

    def _on_error(self, exc: UnicodeDecodeError):
        self.invalid += 1
        return "\ufffd", exc.end

    def decode(self, data: bytes, final: bool = False) -> str:
        if self.decoder is None:
            encoding = "utf-8"
            for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                             (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
                             (codecs.BOM_UTF16_BE, "utf-16")):
                if data.startswith(bom):
                    encoding = enc
                    break
            handler = f"count-{id(self)}"
            codecs.register_error(handler, self._on_error)
            self.decoder = codecs.getincrementaldecoder(encoding)(errors=handler)
        text = self.decoder.decode(data, final)
        if "\x00" in text:
            self.nul += text.count("\x00")
            text = text.replace("\x00", "")
        return text

    def fixes(self) -> Iterator[tuple]:
        if self.invalid:
            yield ("fix", "invalid_utf8")
        if self.nul:
            yield ("fix", "nul_bytes")


def split_pieces(text: str, tail: bool) -> tuple[list[str], str]:
    """Cut text into pieces of about PIECE_CHARS at whitespace. Returns (pieces, remainder);
    with tail=True the remainder is empty (everything is emitted)."""
    pieces = []
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _whitespace_before(text, start + PIECE_CHARS, start)
        pieces.append(text[start:cut])
        start = cut
    rest = text[start:]
    if tail:
        if rest:
            pieces.append(rest)
        return pieces, ""
    return pieces, rest


def _whitespace_before(text: str, end: int, start: int) -> int:
    for i in range(end, max(start, end - 4096), -1):
        if text[i - 1].isspace():
            return i
    return end  # no whitespace nearby: one giant "word", cut anywhere


def _emit_pieces(key: str, pieces: Iterator[str]) -> Iterator[tuple]:
    """Doc events for non-blank pieces; an empty document is a skip."""
    pending = None
    for piece in pieces:
        if not piece.strip():
            continue
        if pending is not None:
            yield ("doc", key, pending[0], pending[1], False, None)
            pending = (piece, False)
        else:
            pending = (piece, True)
    if pending is None:
        yield ("skip", "empty")
    else:
        yield ("doc", key, pending[0], pending[1], True, None)


def _text_file(path: Path, root: str) -> Iterator[tuple]:
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
        raise DataPrepError(f"{path}: cannot read ({e})") from e
    yield from dec.fixes()


def _jsonl_file(path: Path, root: str) -> Iterator[tuple]:
    name = str(path.relative_to(root)) if Path(root).is_dir() else path.name
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataPrepError(f"{path}: cannot read ({e})") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            dec = CountingDecoder()
            line = dec.decode(raw, final=True)
            try:
                obj = json.loads(line)
            except ValueError:
                yield ("skip", "invalid_json")
                continue
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                yield ("skip", "missing_text")
                continue
            if "\x00" in text:
                dec.nul += text.count("\x00")
                text = text.replace("\x00", "")
            key = f"{name}:{obj.get('id', lineno)}"
            pieces, _ = split_pieces(text, tail=True)
            yield from _emit_pieces(key, iter(pieces))
            yield from dec.fixes()


# Datasets with one sentence per row: rows are joined into pseudo-documents (README explains).
SENTENCE_PER_ROW = {"bookcorpus", "bookcorpus/bookcorpus", "rojagtap/bookcorpus"}
ROWS_PER_PSEUDO_DOC = 512


def _hf_dataset(src: SourceSpec) -> Iterator[tuple]:
    import datasets

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
        raise DataPrepError(f"{src.spec}: cannot load the dataset ({type(e).__name__}: {e})") from e
    if first is None:
        raise DataPrepError(f"{src.spec}: the dataset split {split!r} is empty")
    join = ROWS_PER_PSEUDO_DOC if name.lower() in SENTENCE_PER_ROW else 1

    def all_rows():
        yield first
        yield from rows

    buf: list[str] = []
    buf_start = 0
    for i, row in enumerate(all_rows()):
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            yield ("skip", "missing_text")
            continue
        nul = "\x00" in text
        text = text.replace("\x00", "")
        if join == 1:
            pieces, _ = split_pieces(text, tail=True)
            yield from _emit_pieces(f"{src.spec}#{row.get('id', i)}", iter(pieces))
            if nul:
                yield ("fix", "nul_bytes")
            continue
        if not buf:
            buf_start = i
        buf.append(text)
        if len(buf) == join:
            yield from _emit_pieces(f"{src.spec}#{buf_start}", iter([" ".join(buf)]))
            buf = []
    if buf:
        yield from _emit_pieces(f"{src.spec}#{buf_start}", iter([" ".join(buf)]))


# ---------------------------------------------------------------- MediaWiki XML dumps

DISAMBIGUATION = re.compile(
    r"\{\{\s*(disambig\w*|dab|hndis|geodis|numberdis|letter-numbercombdisambig|surname|"
    r"begriffsklärung|homonymie|desambiguación|desambiguação|disambigua|неоднозначность|"
    r"многозначность|пояснителна страница|消歧义|曖昧さ回避|doorverwijspagina)\s*[|}]",
    re.IGNORECASE)


def _open_dump(path: Path):
    return bz2.open(path, "rb") if path.name.endswith(".bz2") else open(path, "rb")


def _utf8_lines(f) -> Iterator[bytes]:
    """The dump's lines as UTF-8 bytes. Dumps are UTF-8, but re-encoded copies exist (gensim's
    Bulgarian test dump is UTF-16 with a BOM): those are transcoded line by line."""
    head = f.peek(4)[:4]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-32" if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)) else "utf-16"
        for line in io.TextIOWrapper(f, encoding=encoding, errors="replace", newline=""):
            yield line.encode("utf-8")
    else:
        yield from f


def _wiki_dump(path: Path) -> Iterator[tuple]:
    """Split the dump into <page> blocks line by line; each block is parsed on its own (in a
    worker, by wiki_page), so a malformed page is skipped instead of ending the whole dump."""
    try:
        f = _open_dump(path)
        non_prose: tuple[str, ...] = ()
        siteinfo: list[bytes] | None = None
        page: list[bytes] | None = None
        with f:
            for line in _utf8_lines(f):
                stripped = line.strip()
                if page is not None:
                    page.append(line)
                    if stripped == b"</page>":
                        yield ("page", path.name, b"".join(page), non_prose)
                        page = None
                    elif stripped == b"<page>":  # the previous page never closed
                        yield ("skip", "malformed_page")
                        page = [line]
                elif stripped == b"<page>":
                    page = [line]
                elif stripped.startswith(b"<siteinfo"):
                    siteinfo = [line]
                elif siteinfo is not None:
                    siteinfo.append(line)
                    if stripped == b"</siteinfo>":
                        non_prose = wiki_non_prose(_namespaces(b"".join(siteinfo)))
                        siteinfo = None
            if page is not None:
                yield ("skip", "malformed_page")  # the file ends inside a page
    except EOFError as e:
        raise DataPrepError(f"{path}: truncated compressed file ({e})") from e
    except OSError as e:
        raise DataPrepError(f"{path}: cannot read ({e})") from e


def _namespaces(xml: bytes) -> dict[str, str]:
    """Localized names of the File (6) and Category (14) namespaces, e.g. 'Категория'."""
    try:
        root = ET.fromstring(xml.decode("utf-8", "replace"))
    except ET.ParseError:
        return {}
    return {ns.get("key"): (ns.text or "") for ns in root.iter() if ns.tag.endswith("namespace")}


def wiki_non_prose(namespaces: dict[str, str]) -> tuple[str, ...]:
    return tuple(namespaces[k] for k in ("6", "14") if namespaces.get(k))


def wiki_page(dump_name: str, xml: bytes, non_prose: tuple[str, ...]) -> Iterator[tuple]:
    """The events of one <page> block (parsed in a worker: XML parsing is half the reader's cost)."""
    dec = CountingDecoder()
    try:
        page = ET.fromstring(dec.decode(xml, final=True))
    except ET.ParseError:
        yield ("skip", "malformed_page")
        return
    ns = page.findtext("ns")
    title = page.findtext("title")
    text_el = page.find("revision/text")
    if ns is None or title is None or text_el is None:
        yield ("skip", "malformed_page")
        return
    if ns.strip() != "0":
        yield ("skip", "not_article_namespace")
        return
    text = text_el.text or ""
    if page.find("redirect") is not None or text.lstrip()[:1] == "#" and "redirect" in text[:20].lower():
        yield ("skip", "redirect")
        return
    if title.endswith("(disambiguation)") or DISAMBIGUATION.search(text):
        yield ("skip", "disambiguation")
        return
    if not text.strip():
        yield ("skip", "empty")
        return
    key = f"{dump_name}#{page.findtext('id') or title}"
    # One piece: markup must be cleaned whole, with the dump's own namespace names.
    yield ("doc", key, text, True, True, non_prose)
    yield from dec.fixes()
