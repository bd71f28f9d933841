"""MediaWiki XML dumps: a unit's reader cuts its part of a dump into raw <page> blocks (Page
events); the worker then parses each block with wiki_page into Doc, Skip and Fix events. Markup cleaning itself is
wikitext.WikiCleaner's job."""
from __future__ import annotations

import bz2
import codecs
import io
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import UserError

from .decoding import CountingDecoder
from .events import Doc, Fix, Page, Skip

DISAMBIGUATION = re.compile(
    r"\{\{\s*(disambig\w*|dab|hndis|geodis|numberdis|letter-numbercombdisambig|surname|"
    r"begriffsklärung|homonymie|desambiguación|desambiguação|disambigua|неоднозначность|"
    r"многозначность|пояснителна страница|消歧义|曖昧さ回避|doorverwijspagina)\s*[|}]",
    re.IGNORECASE)


def is_wiki_dump(p: Path) -> bool:
    name = p.name
    return ".xml" in name and (name.endswith(".bz2") or name.endswith(".xml")) and "-index" not in name


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


def wiki_dump(f, path: Path) -> Iterator[Page | Skip]:
    """A whole dump file (f: its bytes, opened by the caller) as Page and Skip events."""
    try:
        with (bz2.open(f, "rb") if path.name.endswith(".bz2") else f) as raw:
            yield from wiki_pages(_utf8_lines(raw), path, ())
    except EOFError as e:
        raise UserError(f"{path}: truncated compressed file ({e})") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e})") from e


def wiki_pages(lines: Iterable[bytes], path: Path, non_prose: tuple[str, ...]) -> Iterator[Page | Skip]:
    """Split a dump's lines into <page> blocks; each block is parsed on its own (in a worker, by
    wiki_page), so a malformed page is skipped instead of ending the whole dump. non_prose: the
    namespace names of the dump's header when the lines begin after it (a unit of a dump)."""
    siteinfo: list[bytes] | None = None
    page: list[bytes] | None = None
    for line in lines:
        stripped = line.strip()
        if page is not None:
            page.append(line)
            if stripped == b"</page>":
                yield Page(path.name, b"".join(page), non_prose)
                page = None
            elif stripped == b"<page>":  # the previous page never closed
                yield Skip("malformed_page")
                page = [line]
        elif stripped == b"<page>":
            page = [line]
        elif stripped.startswith(b"<siteinfo"):
            siteinfo = [line]
        elif siteinfo is not None:
            siteinfo.append(line)
            if stripped == b"</siteinfo>":
                non_prose = _non_prose(_namespaces(b"".join(siteinfo)))
                siteinfo = None
    if page is not None:
        yield Skip("malformed_page")  # the input ends inside a page


def dump_header(path: Path) -> tuple[str, ...]:
    """The dump's File and Category namespace names, from its <siteinfo> (read up to the first
    page: the units after the first need them)."""
    try:
        with _open_dump(path) as f:
            head = []
            for line in _utf8_lines(f):
                head.append(line)
                if line.strip() in (b"</siteinfo>", b"<page>"):
                    break
    except (EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable dump ({e})") from e
    text = b"".join(head)
    i, j = text.find(b"<siteinfo"), text.find(b"</siteinfo>")
    return _non_prose(_namespaces(text[i:j + len(b"</siteinfo>")])) if 0 <= i < j else ()


def _namespaces(xml: bytes) -> dict[str, str]:
    """Localized names of the File (6) and Category (14) namespaces, e.g. 'Категория'."""
    try:
        root = ET.fromstring(xml.decode("utf-8", "replace"))
    except ET.ParseError:
        return {}
    return {ns.get("key"): (ns.text or "") for ns in root.iter() if ns.tag.endswith("namespace")}


def _non_prose(namespaces: dict[str, str]) -> tuple[str, ...]:
    return tuple(namespaces[k] for k in ("6", "14") if namespaces.get(k))


def wiki_page(page_event: Page) -> Iterator[Doc | Skip | Fix]:
    """The events of one <page> block (parsed in a worker: XML parsing is half the reader's cost)."""
    dec = CountingDecoder()
    try:
        page = ET.fromstring(dec.decode(page_event.xml, final=True))
    except ET.ParseError:
        yield Skip("malformed_page")
        return
    ns = page.findtext("ns")
    title = page.findtext("title")
    text_el = page.find("revision/text")
    if ns is None or title is None or text_el is None:
        yield Skip("malformed_page")
        return
    if ns.strip() != "0":
        yield Skip("not_article_namespace")
        return
    text = text_el.text or ""
    if page.find("redirect") is not None or text.lstrip()[:1] == "#" and "redirect" in text[:20].lower():
        yield Skip("redirect")
        return
    if title.endswith("(disambiguation)") or DISAMBIGUATION.search(text):
        yield Skip("disambiguation")
        return
    if not text.strip():
        yield Skip("empty")
        return
    key = f"{page_event.dump}#{page.findtext('id') or title}"
    # One piece: markup must be cleaned whole, with the dump's own namespace names.
    yield Doc(key, text, True, True, page_event.non_prose)
    yield from dec.fixes()
