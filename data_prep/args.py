"""`python -m data_prep build`'s arguments: typed, documented, checked in one place."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

from .sources import SourceSpec, parse_spec
from .workers import WorkerSettings


def embedded_corpus() -> str:
    """The real (shortened) English Wikipedia dump that ships in gensim's test data."""
    try:
        import gensim  # optional: only the default corpus needs it, and it is slow to import
    except ImportError as e:
        raise UserError("the embedded default corpus needs the package gensim "
                        "(pip install -r requirements.txt)") from e
    return "wikipedia:" + str(Path(gensim.__file__).parent / "test" / "test_data" /
                              "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


@dataclass
class BuildArgs:
    out: Path
    """The output directory (OUT)."""
    sources: list[str] = field(default_factory=list)
    """--source specs, in mixing order; empty: the embedded demo corpus (embedded_corpus)."""
    seq_len: int = 128
    """Tokens per packed sequence, [CLS] included."""
    vocab_size: int | None = None
    """Train a WordPiece vocabulary of this size (instead of --tokenizer)."""
    tokenizer: str | None = None
    """vocab.txt, tokenizer.json or a Hugging Face tokenizer directory; none and no vocab_size:
    'bert-base-uncased'."""
    cased: bool = False
    """Keep case (vocab.txt or a trained vocabulary)."""
    workers: int = os.cpu_count() or 1
    """Worker processes; the output does not depend on it."""
    seed: int = 0
    """Decides which documents make the validation split, and the shuffle of each split."""
    val_fraction: float = 0.005
    """Fraction of the tokens in the validation split, met by whole documents (split.py)."""
    shard_size: int = 1 << 17
    """Sequences per shard."""
    unit_mb: float = 16.0
    """Size of a unit of work in MB of input as stored (compressed for .bz2): what one worker
    reads at a time, and what the pack stage checkpoints and array tasks share out (units.py)."""
    overwrite: bool = False
    """Replace a finished OUT (or an unfinished build made with other arguments)."""
    task: str | None = None
    """One Slurm array task's share of the chunks, "I/N" (array.py)."""

    def recorded(self) -> dict:
        """What determines the output bytes (not --workers, --overwrite, --task)."""
        d = asdict(self)
        for k in ("out", "workers", "overwrite", "task"):
            d.pop(k)
        return d

    def task_slice(self) -> tuple[int, int] | None:
        if self.task is None:
            return None
        try:
            i, n = (int(x) for x in self.task.split("/"))
        except ValueError:
            i = n = -1
        if not 0 <= i < n:
            raise UserError(f"--task {self.task}: expected I/N with 0 <= I < N")
        return i, n

    def check(self) -> list[SourceSpec]:
        """Fills in the defaults, raises UserError on a bad value; returns the parsed sources.
        Touches nothing on disk."""
        if not self.sources:
            self.sources = [embedded_corpus()]
        if self.vocab_size is None and self.tokenizer is None:
            self.tokenizer = "bert-base-uncased"
        if self.vocab_size is not None and self.tokenizer is not None:
            raise UserError("give --vocab-size or --tokenizer, not both")
        if not 8 <= self.seq_len <= 1 << 16:
            raise UserError(f"--seq-len {self.seq_len}: must be between 8 and 65536")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.shard_size < 1:
            raise UserError(f"--shard-size {self.shard_size}: must be at least 1 sequence")
        if not self.unit_mb > 0:
            raise UserError(f"--unit-mb {self.unit_mb}: must be positive")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: must be at least 1")
        self.task_slice()
        if self.vocab_size is not None and self.vocab_size < 100:
            raise UserError(f"--vocab-size {self.vocab_size}: too small for WordPiece")
        specs = [parse_spec(s) for s in self.sources]
        for s in specs:
            if s.kind != "hf" and not Path(s.target).exists():
                raise UserError(f"--source {s.spec}: {s.target}: no such file or directory")
        return specs

    def unit_bytes(self) -> int:
        return max(1, int(self.unit_mb * 1e6))

    def worker_settings(self, tokenizer_dir: Path | None = None, dtype=None) -> WorkerSettings:
        """For counting words (no tokenizer_dir), or for cleaning and encoding with the tokenizer
        saved in tokenizer_dir into token ids of dtype. Call after check()."""
        specs = tuple(parse_spec(s) for s in self.sources)
        if tokenizer_dir is None:
            return WorkerSettings(specs, self.seed, cased=self.cased)
        return WorkerSettings(specs, self.seed, str(tokenizer_dir / "tokenizer.json"), self.cased,
                              np.dtype(dtype).str)
