"""Packing documents back to back into fixed-length sequences, and the boundary bitmaps.

A sequence is [CLS] followed by seq_len - 1 tokens of the stream "doc1 [SEP] doc2 [SEP] ...";
a long document continues in the next sequence (after that sequence's own [CLS]). Only the very
last sequence of a split may be padded.

Boundaries: one bit per position, set where a document begins (and where padding begins);
position 0 is always set, so [CLS] belongs to the first document of its sequence. Stored as
np.packbits(bits, axis=1): uint8 [num_sequences, ceil(seq_len / 8)]. Segment ids are
cumsum(unpackbits(row)) - 1.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

BOUNDARY_FORMAT = ("doc-start bitmap: uint8 [num_sequences, ceil(seq_len/8)] = "
                   "numpy.packbits(starts, axis=1) (big bit order); bit j is set where a document "
                   "or the padding begins at position j; bit 0 is always set")


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class SplitPacker:
    """Packs one split's token stream and appends finished sequences to two raw files
    (tokens, boundary bits). Its whole state fits in a small JSON object, so a build can stop
    after any flush and continue from there."""

    def __init__(self, work: Path, name: str, seq_len: int, ids: dict, dtype, state: dict | None):
        self.seq_len, self.cls, self.sep, self.pad = seq_len, ids["cls"], ids["sep"], ids["pad"]
        self.dtype = np.dtype(dtype)
        self.tokens_path, self.bits_path = work / f"{name}.tokens", work / f"{name}.bits"
        state = state or {}
        self.num_sequences = state.get("num_sequences", 0)
        self.num_tokens = state.get("num_tokens", 0)
        self.doc_open = state.get("doc_open", False)
        self.stream = [np.asarray(state.get("stream", []), dtype=np.int64)]
        self.stream_len = len(self.stream[0])
        self.starts = list(state.get("starts", []))
        # Anything written after the last saved state is discarded: it is written again.
        for path, size in ((self.tokens_path, self.num_sequences * seq_len * self.dtype.itemsize),
                           (self.bits_path, self.num_sequences * self.row_bytes)):
            with open(path, "ab") as f:
                f.truncate(size)
        self.tokens_f = open(self.tokens_path, "ab")
        self.bits_f = open(self.bits_path, "ab")

    @property
    def row_bytes(self) -> int:
        return (self.seq_len + 7) // 8

    def add(self, ids: np.ndarray, first: bool, last: bool) -> bool | None:
        """One piece of a document. Returns True/False at the document's last piece (kept, or
        dropped for having no tokens), None before."""
        if first:
            self.doc_open = False
        if len(ids):
            if not self.doc_open:
                self.starts.append(self.stream_len)
                self.doc_open = True
            self.stream.append(ids)
            self.stream_len += len(ids)
        if not last:
            return None
        if self.doc_open:
            self.stream.append(np.array([self.sep]))
            self.stream_len += 1
            self.doc_open = False
            return True
        return False

    def flush(self, final: bool = False) -> None:
        """Write every full sequence; with final=True also the padded last one."""
        width = self.seq_len - 1
        stream = np.concatenate(self.stream) if len(self.stream) > 1 else self.stream[0]
        n = len(stream) // width
        if final and len(stream) % width:
            n += 1
        if n == 0:
            return
        body = np.full((n, width), self.pad, dtype=np.int64)
        take = min(len(stream), n * width)
        body.reshape(-1)[:take] = stream[:take]
        rows = np.concatenate([np.full((n, 1), self.cls, dtype=np.int64), body], axis=1)
        bits = np.zeros((n, self.seq_len), dtype=bool)
        bits[:, 0] = True
        starts = np.asarray(self.starts, dtype=np.int64)
        # A document that begins right after [CLS] shares its segment with that [CLS].
        starts = starts[(starts < take) & (starts % width != 0)]
        bits[starts // width, starts % width + 1] = True
        if take < n * width:  # padding begins: its own segment
            bits[take // width, take % width + 1] = True
        self.tokens_f.write(rows.astype(self.dtype).tobytes())
        self.bits_f.write(np.packbits(bits, axis=1).tobytes())
        self.num_sequences += n
        self.num_tokens += take + n
        rest = stream[take:]
        self.stream, self.stream_len = [rest], len(rest)
        self.starts = [s - take for s in self.starts if s >= take]

    def state(self) -> dict:
        """Syncs the files, then returns the state that matches them."""
        for f in (self.tokens_f, self.bits_f):
            f.flush()
            os.fsync(f.fileno())
        stream = np.concatenate(self.stream) if len(self.stream) > 1 else self.stream[0]
        return {"num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
                "doc_open": self.doc_open, "stream": stream.tolist(), "starts": self.starts}

    def close(self) -> None:
        self.tokens_f.close()
        self.bits_f.close()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The packed, unshuffled sequences, memory-mapped."""
        shape = (self.num_sequences, self.seq_len)
        if self.num_sequences == 0:
            return np.zeros(shape, self.dtype), np.zeros((0, self.row_bytes), np.uint8)
        tokens = np.memmap(self.tokens_path, dtype=self.dtype, mode="r", shape=shape)
        bits = np.memmap(self.bits_path, dtype=np.uint8, mode="r",
                         shape=(self.num_sequences, self.row_bytes))
        return tokens, bits
