"""The worker processes: each takes a unit (units.py) and reads, decompresses, splits, parses,
cleans and tokenizes it; results come back in unit order with a bounded number of units in
flight. The main process only orders results and packs."""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from .chunks import Chunk, Piece, UnitResult, iter_chunks
from .events import Doc, Page, SourceCounts
from .sources import SourceSpec, read_unit
from .split import doc_hash
from .units import Meter, Unit
from .vocab import add_counts, count_words
from .wikidump import wiki_page
from .wikitext import WikiCleaner

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker process starts with; the same for every unit of a stage."""
    specs: tuple[SourceSpec, ...]
    """The --source specs (a unit names its source by index)."""
    seed: int
    """--seed: seeds each document's hash, which decides its split (split.py)."""
    tokenizer_json: str | None = None
    """The saved tokenizer.json to encode with; None: the workers only clean and count words (for
    training a vocabulary)."""
    cased: bool = False
    """--cased (how words are counted for a vocabulary)."""
    dtype: str = "<u4"
    """numpy dtype of the token ids they return (pack.token_dtype of the vocabulary)."""


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

    def chunks(self, unit: Unit, meter: Meter) -> Iterator[tuple[list[Doc], SourceCounts]]:
        """The unit read, in chunks of cleaned document pieces with their counts."""
        for chunk in iter_chunks(read_unit(unit, self.settings.specs[unit.source], meter)):
            yield self.documents(chunk)

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


def process_unit(unit: Unit) -> UnitResult:
    """Worker: read, clean and tokenize one unit."""
    meter, pieces, counts = Meter(), [], SourceCounts()
    for docs, chunk_counts in _worker.chunks(unit, meter):
        counts.add(chunk_counts)
        encodings = _worker.tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)
        pieces += [Piece(doc_hash(d.key, _worker.settings.seed), np.array(enc.ids, dtype=_worker.settings.dtype),
                         d.first, d.last) for d, enc in zip(docs, encodings)]
    return UnitResult(unit.index, unit.source, pieces, counts, meter.bytes)


def count_unit(unit: Unit) -> tuple[int, dict[str, int], int]:
    """Worker: the word counts of one unit's documents (for training a vocabulary: on every
    document, since the split is chosen from token counts, after tokenizing), and the bytes it read."""
    meter, counts = Meter(), {}
    for docs, _ in _worker.chunks(unit, meter):
        add_counts(counts, count_words([d.text for d in docs], _worker.settings.cased))
    return unit.index, counts, meter.bytes


def run_ordered(fn: Callable[[Unit], T], units: Iterable[Unit], workers: int,
                settings: WorkerSettings) -> Iterator[T]:
    """fn over units, results in unit order, at most a few units in flight (bounded memory).
    One worker runs in this process."""
    if workers == 1:
        _init_worker(settings)
        for u in units:
            yield fn(u)
        return
    # fork: workers inherit the imported modules (no start-up cost) and callers need no
    # `if __name__ == "__main__"` guard; the workers touch no thread-owned state of the parent.
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(settings,)) as pool:
        window: deque = deque()
        for u in units:
            window.append(pool.submit(fn, u))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


class Progress:
    """One tqdm bar over units, with the MB/s read and (when tokenizing) the tokens/s."""

    def __init__(self, desc: str, total: int, done: int = 0):
        self.bar = tqdm(desc=desc, total=total, initial=done, unit=" units", smoothing=0.05,
                        file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        self.read = self.tokens = 0

    def add(self, bytes_read: int, tokens: int | None = None) -> None:
        self.read += bytes_read
        elapsed = max(self.bar.format_dict["elapsed"], 1e-9)
        rates = f"{self.read / 1e6 / elapsed:,.1f} MB/s read"
        if tokens is not None:
            self.tokens += tokens
            rates += f", {self.tokens / elapsed:,.0f} tokens/s"
        self.bar.update()
        self.bar.set_postfix_str(rates, refresh=False)

    def add_result(self, result: UnitResult) -> None:
        self.add(result.bytes_read, sum(len(p.ids) for p in result.pieces))

    def close(self) -> None:
        self.bar.close()


def vocabulary_counts(units: list[Unit], workers: int, settings: WorkerSettings,
                      saved: Callable[[int], dict[str, int] | None] = lambda i: None,
                      save: Callable[[int, dict[str, int]], None] | None = None) -> dict[str, int]:
    """The word counts over units, counted by the workers in parallel (a unit whose
    counts `saved` returns is not read again; `save` keeps each counted unit's)."""
    print(f"counting words in {len(units)} unit(s) for a WordPiece vocabulary", file=sys.stderr)
    total: dict[str, int] = {}
    todo = []
    for u in units:
        counts = saved(u.index)
        if counts is None:
            todo.append(u)
        else:
            add_counts(total, counts)
    progress = Progress("count words", len(units), len(units) - len(todo))
    for index, counts, nbytes in run_ordered(count_unit, todo, workers, settings):
        if save is not None:
            save(index, counts)
        add_counts(total, counts)
        progress.add(nbytes)
    progress.close()
    return total
