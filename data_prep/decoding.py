"""Bytes to text for the readers: an incremental decoder that counts what it repairs, and the
cut of long texts into pieces (so that no reader holds a whole huge document)."""
from __future__ import annotations

import codecs
from typing import Iterator

from .events import Fix

PIECE_CHARS = 1 << 20  # long documents are cut into ~1 MB pieces, at whitespace
# UTF-32's before UTF-16's: they begin with the same bytes.
BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
        (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


class CountingDecoder:
    """UTF-8 (or the BOM's encoding) decoded incrementally; invalid bytes become U+FFFD and are
    counted, NUL characters are dropped and counted."""

    def __init__(self, bom: bool = True):
        self.bom = bom  # False: the bytes begin mid-file (a unit's range), so no BOM is looked for
        self.decoder = None
        self.invalid = 0
        self.nul = 0

    def _on_error(self, exc: UnicodeDecodeError):
        self.invalid += 1
        return "\ufffd", exc.end

    def decode(self, data: bytes, final: bool = False) -> str:
        if self.decoder is None:
            encoding = "utf-8"
            for bom, enc in BOMS:
                if self.bom and data.startswith(bom):
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

    def fixes(self) -> Iterator[Fix]:
        if self.invalid:
            yield Fix("invalid_utf8")
        if self.nul:
            yield Fix("nul_bytes")


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
