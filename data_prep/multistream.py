"""Rewrite a MediaWiki XML dump in Wikimedia's multistream layout, or as N complete part dumps.

Why: the data preparation reads Wikipedia dumps in parallel, one bz2 stream at a time, as
Wikimedia publishes them (`...-pages-articles-multistream.xml.bz2`: concatenated bz2 streams of 100
<page> blocks each, with `...-multistream-index.txt.bz2` giving OFFSET:PAGE_ID:TITLE per page).
Users holding a plain single-stream dump (or a plain .xml) need that layout made for them, and tests
and benchmarks need it built from the real dumps we have offline, some grown to benchmark size
(min_mb). The split form (parts) is Wikimedia's other layout: several complete, smaller dumps.

Nothing is parsed as XML: the dump is cut into lines at its `<page>` and `</page>` lines, so the
output decompresses to the source's own bytes (UTF-16/32 copies with a BOM are transcoded to UTF-8:
a stream read on its own from an index offset has no BOM to tell its encoding). Nothing holds more
than one stream's pages at a time.
"""
from __future__ import annotations

import bz2
import codecs
import io
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

from pipeline.errors import UserError, writing

from .files import fsync_dir

LEVEL = 9  # 900 kB blocks, as Wikimedia compresses: stream sizes and ratios then match theirs
MB = 1 << 20  # min_mb counts MiB, so the result also reaches min_mb decimal megabytes
HEAD_BYTES = 1 << 16  # a dump names <mediawiki> within its first bytes; anything else is not one
TITLE = re.compile(rb"<title>(.*?)</title>")
PAGE_ID = re.compile(rb"<id>(\d+)</id>")  # the first one in a page is the page's own
XML_ENCODING = re.compile(rb"""(<\?xml[^>]*encoding=["'])[^"']*""")


@dataclass(frozen=True)
class Page:
    xml: bytes  # from its <page> line (after any blank lines since the previous page) to </page>
    id: int
    title: bytes  # as written in the XML (entities not decoded), as in Wikimedia's index


def dump_name(src: Path) -> str:
    """NAME: the source's name without its .bz2/.xml suffixes and a -multistream suffix."""
    name = src.name
    for suffix in (".bz2", ".xml", "-multistream"):
        name = name.removesuffix(suffix)
    return name


def write_multistream(src: Path, out_dir: Path, *, pages_per_stream: int = 100, parts: int = 1,
                      min_mb: float = 0, index: bool = True) -> list[Path]:
    """Writes SRC (a MediaWiki XML dump: .xml or .bz2, single or multi stream) into OUT_DIR.

    parts == 1: NAME-multistream.xml.bz2 (the header before the first <page> is stream 0, then
    pages_per_stream pages a stream, then the footer after the last </page> on its own) and, with
    index, NAME-multistream-index.txt.bz2 (OFFSET:PAGE_ID:TITLE a page, OFFSET the byte offset of
    its stream). parts > 1: NAME-part1.xml.bz2 .. NAME-partN.xml.bz2, each a complete dump (header,
    a consecutive, even share of the pages, footer) in one bz2 stream, like Wikimedia's
    non-multistream pages-articlesN files, so no index. min_mb > 0: the pages repeat (copy r gets
    title 'TITLE (copy r)' and page id id + r * (max_id + 1)) until the XML holds min_mb MiB.
    Returns the written paths; each appears complete (renamed into place) or not at all."""
    src, out_dir = Path(src), Path(out_dir)
    if pages_per_stream < 1 or parts < 1 or min_mb < 0:
        raise UserError("pages_per_stream and parts must be >= 1 and min_mb >= 0 "
                        f"(got {pages_per_stream}, {parts}, {min_mb})")
    _check_source(src)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise UserError(f"{out_dir}: not a directory") from e
    min_bytes = int(min_mb * MB)
    name = dump_name(src)
    if parts == 1:
        paths = [out_dir / f"{name}-multistream.xml.bz2"]
        if index:
            paths.append(out_dir / f"{name}-multistream-index.txt.bz2")
    else:
        paths = [out_dir / f"{name}-part{k}.xml.bz2" for k in range(1, parts + 1)]
    tmps = [p.with_name(f".{p.name}.tmp{os.getpid()}") for p in paths]
    try:
        with writing(paths[0], partial=tmps):
            if parts == 1:
                _write_streams(_dump(src, min_bytes), pages_per_stream, tmps[0],
                               tmps[1] if index else None)
            else:
                # An even split needs the page count first: one dry pass (cheaper than holding).
                count = sum(isinstance(item, Page) for item in _dump(src, min_bytes))
                if count < parts:
                    raise UserError(f"{src}: {count} page(s) cannot fill {parts} parts")
                _write_parts(_dump(src, min_bytes), count, tmps)
            for tmp, path in zip(tmps, paths):  # each file is fsynced: only complete ones appear
                os.replace(tmp, path)
            fsync_dir(out_dir)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return paths


def _write_streams(items: Iterator[bytes | Page], per: int, out: Path, index: Path | None) -> None:
    """One bz2 stream per group of items; the index gets each page with its stream's offset."""
    offset = 0
    index_bz = bz2.BZ2Compressor(LEVEL)
    with open(out, "wb") as f, (open(index, "wb") if index else nullcontext()) as idx:
        for xml, pages in _streams(items, per):
            stream = _compress(xml)
            f.write(stream)
            if idx:
                for p in pages:
                    idx.write(index_bz.compress(b"%d:%d:%s\n" % (offset, p.id, p.title)))
            offset += len(stream)
        if idx:
            idx.write(index_bz.flush())
            _sync(idx)
        _sync(f)


def _compress(xml: bytes) -> bytes:
    """XML as one complete bz2 stream: a fresh compressor, so a reader can start at its offset."""
    c = bz2.BZ2Compressor(LEVEL)
    return c.compress(xml) + c.flush()


def _streams(items: Iterator[bytes | Page], per: int) -> Iterator[tuple[bytes, list[Page]]]:
    """The header alone, the pages `per` at a time, the footer alone: each a stream's XML."""
    group: list[Page] = []
    for item in items:
        if isinstance(item, Page):
            group.append(item)
            if len(group) == per:
                yield b"".join(p.xml for p in group), group
                group = []
        else:  # the header comes first and the footer last: neither shares a stream with pages
            if group:
                yield b"".join(p.xml for p in group), group
                group = []
            yield item, []


def _write_parts(items: Iterator[bytes | Page], count: int, outs: list[Path]) -> None:
    """outs[k] gets the header, pages [k * count // n, (k + 1) * count // n) and the footer."""
    n = len(outs)
    header = next(items)
    assert isinstance(header, bytes)
    compressors = [bz2.BZ2Compressor(LEVEL) for _ in outs]
    files = [open(p, "wb") for p in outs]
    try:
        k, seen = 0, 0
        files[0].write(compressors[0].compress(header))
        for item in items:
            if isinstance(item, Page):
                if seen == (k + 1) * count // n:  # part k is full: the next part starts
                    k += 1
                    files[k].write(compressors[k].compress(header))
                files[k].write(compressors[k].compress(item.xml))
                seen += 1
            else:  # the footer
                for f, c in zip(files, compressors):
                    f.write(c.compress(item) + c.flush())
                    _sync(f)
    finally:
        for f in files:
            f.close()


def _dump(src: Path, min_bytes: int) -> Iterator[bytes | Page]:
    """The header, the pages, the footer; with min_bytes, copies of the pages (new titles, ids)
    follow the originals until the whole XML holds min_bytes. The source is read again for each
    copy rather than held."""
    items = _read(src)
    header = next(items)
    assert isinstance(header, bytes)
    yield header
    size, max_id, footer = len(header), -1, b""
    for item in items:
        if isinstance(item, Page):
            size += len(item.xml)
            max_id = max(max_id, item.id)
            yield item
        else:
            footer = item
    size += len(footer)
    if size < min_bytes and max_id < 0:
        raise UserError(f"{src}: no <page> to repeat up to {min_bytes / MB:g} MB")
    copy = 0
    while size < min_bytes:
        copy += 1
        for item in _read(src):
            if not isinstance(item, Page):
                continue
            if size >= min_bytes:
                break
            page = _renamed(item, copy, item.id + copy * (max_id + 1))
            size += len(page.xml)
            yield page
    yield footer


def _renamed(page: Page, copy: int, new_id: int) -> Page:
    """The page with ' (copy N)' after its title and new_id as its own (first) <id>."""
    title = page.title + b" (copy %d)" % copy
    xml = TITLE.sub(lambda m: b"<title>" + title + b"</title>", page.xml, count=1)
    xml = PAGE_ID.sub(b"<id>%d</id>" % new_id, xml, count=1)
    return Page(xml, new_id, title)


def _read(src: Path) -> Iterator[bytes | Page]:
    """The source cut at its <page>/</page> lines: the header (everything before the first page),
    each page, the footer (everything after the last </page>), which together are its bytes.
    A file that is not such a dump raises UserError naming it."""
    try:
        with _open(src) as f:
            header: list[bytes] | None = []
            page: list[bytes] | None = None
            between: list[bytes] = []  # lines after a </page> (blank in dumps): the next page's,
            #                            or the footer's after the last page
            page_line = 0
            for number, line in enumerate(_utf8_lines(f), 1):
                stripped = line.strip()
                if page is not None:
                    page.append(line)
                    if stripped == b"</page>":
                        yield _page(src, page_line, b"".join(page))
                        page = None
                    elif stripped == b"<page>":
                        raise UserError(f"{src}: the <page> at line {page_line} never closes")
                elif stripped == b"<page>":
                    if header is not None:
                        yield b"".join(header)
                        header = None
                    page, page_line, between = between + [line], number, []
                elif header is not None:
                    header.append(line)
                else:
                    between.append(line)
    except EOFError as e:
        raise UserError(f"{src}: truncated compressed file ({e})") from e
    except OSError as e:
        raise UserError(f"{src}: cannot read ({e})") from e
    if page is not None:
        raise UserError(f"{src}: ends inside the <page> at line {page_line} (truncated?)")
    if header is not None:  # no page at all: the footer is the closing </mediawiki> line on
        ends = [i for i, line in enumerate(header) if b"</mediawiki>" in line]
        cut = ends[-1] if ends else len(header)
        yield b"".join(header[:cut])
        between = header[cut:]
    footer = b"".join(between)
    if b"</mediawiki>" not in footer:
        raise UserError(f"{src}: ends without </mediawiki> (truncated?)")
    yield footer


def _page(src: Path, line: int, xml: bytes) -> Page:
    title, page_id = TITLE.search(xml), PAGE_ID.search(xml)
    if title is None or page_id is None:
        raise UserError(f"{src}: the <page> at line {line} has no <title> or <id>")
    return Page(xml, int(page_id.group(1)), title.group(1))


def _open(src: Path) -> BinaryIO:
    """bz2 (single or multi stream: bz2 reads concatenated streams) by its magic, not its name."""
    with open(src, "rb") as f:
        magic = f.read(3)
    return bz2.open(src, "rb") if magic == b"BZh" else open(src, "rb")


def _utf8_lines(f: BinaryIO) -> Iterator[bytes]:
    """f's lines as UTF-8 bytes: UTF-8 passes through untouched; a UTF-16/32 BOM means the file is
    transcoded (the BOM dropped, an XML declaration's encoding made UTF-8, line ends kept)."""
    encoding = _bom_encoding(f.peek(4)[:4])
    if encoding is None:
        yield from f
        return
    first = True
    for line in io.TextIOWrapper(f, encoding=encoding, newline=""):
        data = line.encode("utf-8")
        if first:
            data, first = XML_ENCODING.sub(rb"\1UTF-8", data, count=1), False
        yield data


def _bom_encoding(head: bytes) -> str | None:
    # UTF-32 first: its little-endian BOM starts with UTF-16's
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            return encoding
    return None


def _check_source(src: Path) -> None:
    """A dump names <mediawiki> in its first bytes: refuse anything else before writing."""
    if not src.is_file():
        raise UserError(f"{src}: no such file" if not src.exists() else f"{src}: not a file")
    try:
        with _open(src) as f:
            head = f.read(HEAD_BYTES)
    except EOFError as e:
        raise UserError(f"{src}: truncated compressed file ({e})") from e
    except OSError as e:
        raise UserError(f"{src}: cannot read ({e})") from e
    encoding = _bom_encoding(head)
    if encoding is not None:
        head = head.decode(encoding, "ignore").encode("utf-8")
    if b"<mediawiki" not in head:
        raise UserError(f"{src}: not a MediaWiki XML dump (no <mediawiki> in its first "
                        f"{HEAD_BYTES // 1024} KiB)")


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
