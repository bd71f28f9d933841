"""The worker processes: wiki page parsing, markup cleaning and tokenization of chunks, run in
chunk order with a bounded number of chunks in flight."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from tokenizers import Tokenizer

from .chunks import Chunk, ChunkResult, Piece, iter_chunks
from .events import Doc, Page, SourceCounts
from .sources import SourceSpec
from .tokenizer import TokenizerFiles, train_tokenizer
from .wikidump import wiki_page
from .wikitext import WikiCleaner

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker process starts with; the same for every chunk of a stage."""
    seed: int
    """--seed: with val_fraction, decides each document's split."""
    val_fraction: float
    """--val-fraction."""
    tokenizer_json: str | None = None
    """The saved tokenizer.json to encode with; None: the workers only clean (vocabulary training)."""
    dtype: str = "<u4"
    """numpy dtype of the token ids they return (pack.token_dtype of the vocabulary)."""


def is_validation(key: str, seed: int, val_fraction: float) -> bool:
    """A document's split, from its key alone: the same wherever and in whatever order it is read."""
    h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2.0 ** 64


class _Worker:
    """The state of one worker process: its settings, tokenizer and markup cleaners."""

    def __init__(self, settings: WorkerSettings):
        # Each worker is one process of many: a Rayon thread pool in each would oversubscribe.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.settings = settings
        self.tokenizer = (Tokenizer.from_file(settings.tokenizer_json)
                          if settings.tokenizer_json is not None else None)
        # One per namespace-name set (one per dump, in practice).
        self.cleaners: dict[tuple[str, ...], WikiCleaner] = {}

    def is_validation(self, key: str) -> bool:
        return is_validation(key, self.settings.seed, self.settings.val_fraction)

    def documents(self, chunk: Chunk) -> tuple[list[Doc], SourceCounts]:
        """A chunk's document pieces, their text cleaned; pages are parsed here, and what that
        skips or repairs is added to the chunk's counts."""
        counts = chunk.counts.copy()
        docs = []
        for item in chunk.items:
            for ev in (wiki_page(item) if isinstance(item, Page) else (item,)):
                if not isinstance(ev, Doc):
                    counts.count(ev)
                    continue
                if ev.wiki is not None:
                    cleaner = self.cleaners.get(ev.wiki)
                    if cleaner is None:
                        cleaner = self.cleaners[ev.wiki] = WikiCleaner(set(ev.wiki))
                    ev = ev._replace(text=cleaner.clean(ev.text))
                docs.append(ev)
        return docs, counts


_worker: _Worker | None = None  # set in each worker process by _init_worker


def _init_worker(settings: WorkerSettings) -> None:
    global _worker
    _worker = _Worker(settings)


def process_chunk(chunk: Chunk) -> ChunkResult:
    """Worker: clean and tokenize one chunk."""
    docs, counts = _worker.documents(chunk)
    encodings = _worker.tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
    pieces = [Piece(_worker.is_validation(d.key), np.array(enc.ids, dtype=_worker.settings.dtype),
                    d.first, d.last) for d, enc in zip(docs, encodings)]
    return ChunkResult(chunk.index, chunk.source, pieces, counts)


def clean_chunk(chunk: Chunk) -> list[str]:
    """Worker: the cleaned train-split texts of one chunk (for training a vocabulary)."""
    docs, _ = _worker.documents(chunk)
    return [d.text for d in docs if not _worker.is_validation(d.key)]


def run_ordered(fn: Callable[[Chunk], T], chunks: Iterable[Chunk], workers: int,
                settings: WorkerSettings) -> Iterator[T]:
    """fn over chunks, results in chunk order, at most a few chunks in flight (bounded memory).
    One worker runs in this process."""
    if workers == 1:
        _init_worker(settings)
        for c in chunks:
            yield fn(c)
        return
    # fork: workers inherit the imported modules (no start-up cost) and callers need no
    # `if __name__ == "__main__"` guard; the workers touch no thread-owned state of the parent.
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(settings,)) as pool:
        window: deque = deque()
        for c in chunks:
            window.append(pool.submit(fn, c))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def train_vocabulary(specs: list[SourceSpec], vocab_size: int, cased: bool, workers: int,
                     settings: WorkerSettings) -> TokenizerFiles:
    """A WordPiece vocabulary trained on the train split's documents, cleaned by the workers."""
    print(f"training a WordPiece vocabulary of {vocab_size} on the train split", file=sys.stderr)
    texts = (t for batch in run_ordered(clean_chunk, iter_chunks(specs), workers, settings)
             for t in batch)
    return train_tokenizer(texts, vocab_size, cased)
