"""The build as a Slurm array (slurm/prep_data.sh): `--task I/N` runs only the costly part of the
pack stage (cleaning and tokenizing) for the chunks whose index is I modulo N, and saves each
chunk's result in OUT/.array/chunks/. The merge (the same command without --task) packs those
results instead of recomputing them, so its output is byte-identical to a one-machine build with
the same flags.

OUT/.array holds args.json (the recorded arguments and task count), tokenizer/ (the first task's;
all are identical with a given --tokenizer), chunks/NNNNNNNN.npz (a ChunkResult as plain arrays
and JSON, checksummed: nothing on disk can run code when loaded) and task-I.json (written when
task I has finished, with the total chunk count). A chunk file that is truncated, corrupt or not
one is recomputed, with a message naming it: by its task when the task runs again, else by the
merge itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

from .args import BuildArgs
from .chunks import ChunkResult, Piece, iter_chunks
from .events import SourceCounts
from .files import atomic_write_json
from .pack import token_dtype
from .sources import SourceSpec
from .tokenizer import load_saved, load_tokenizer
from .workers import process_chunk, run_ordered, train_vocabulary

ARRAY_DIR = ".array"
# The unfinished build's own files (OUT/.work/state.json, OUT/.array/): 2 since reader counts and
# chunk results became dataclasses, 3 since chunk results are npz + JSON instead of pickles. Work of
# another format is redone, never misread.
WORK_FORMAT = 3


class BadChunkFile(Exception):
    """A chunk file that cannot be used (the message names it and says why)."""


def _chunk_path(arr: Path, index: int) -> Path:
    return arr / "chunks" / f"{index:08d}.npz"


def _digest(ids: np.ndarray, lengths: np.ndarray, flags: np.ndarray, meta: np.ndarray) -> np.ndarray:
    h = hashlib.sha256(ids.dtype.str.encode())
    for a in (ids, lengths, flags, meta):
        h.update(np.ascontiguousarray(a).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def write_result(path: Path, result: ChunkResult) -> None:
    """The result as arrays: every piece's token ids end to end, their lengths, their flags
    (validation, first, last as bits 0-2), the index, source and counts as JSON, and a SHA-256
    of it all; written aside and renamed."""
    pieces = result.pieces
    ids = np.concatenate([x.ids for x in pieces]) if pieces else np.zeros(0, dtype=np.uint16)
    lengths = np.array([len(x.ids) for x in pieces], dtype=np.int64)
    flags = np.array([x.validation | x.first << 1 | x.last << 2 for x in pieces], dtype=np.uint8)
    meta = np.frombuffer(json.dumps({"index": result.index, "source": result.source,
                                     "counts": result.counts.to_json()}).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, ids=ids, lengths=lengths, flags=flags, meta=meta, sha256=_digest(ids, lengths, flags, meta))
    os.replace(tmp, path)


def read_result(path: Path, index: int) -> ChunkResult:
    """Chunk `index`'s result from `path`, checked (loading never unpickles); BadChunkFile
    naming the file when it is missing, truncated, corrupt or of another chunk."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, lengths, flags, meta, digest = (z[k] for k in ("ids", "lengths", "flags", "meta", "sha256"))
    except Exception as e:  # missing, truncated (zip errors), a foreign file, an object array
        raise BadChunkFile(f"{path}: not a readable chunk file ({type(e).__name__}: {e})") from None
    kinds = (ids.dtype.kind in "iu", lengths.dtype == np.int64, flags.dtype == np.uint8, meta.dtype == np.uint8,
             digest.dtype == np.uint8)
    if not all(kinds) or any(a.ndim != 1 for a in (ids, lengths, flags, meta, digest)):
        raise BadChunkFile(f"{path}: not a chunk file (arrays of unexpected types or shapes)")
    if not np.array_equal(digest, _digest(ids, lengths, flags, meta)):
        raise BadChunkFile(f"{path}: checksum mismatch (the file is corrupt)")
    try:
        info = json.loads(meta.tobytes())
        source, counts = int(info["source"]), SourceCounts.from_json(info["counts"])
        if info["index"] != index:
            raise ValueError(f"it holds chunk {info['index']}")
    except (ValueError, KeyError, TypeError) as e:
        raise BadChunkFile(f"{path}: not chunk {index}'s result ({e})") from None
    if len(flags) != len(lengths) or (lengths < 0).any() or int(lengths.sum()) != len(ids):
        raise BadChunkFile(f"{path}: piece lengths do not add up to its tokens")
    ends = np.cumsum(lengths)
    pieces = [Piece(bool(f & 1), ids[e - n:e], bool(f & 2), bool(f & 4)) for f, n, e in zip(flags, lengths, ends)]
    return ChunkResult(index, source, pieces, counts)


def usable(path: Path, index: int) -> bool:
    """Whether chunk `index`'s file is there and sound; a bad one is removed, with a message."""
    if not path.exists():
        return False
    try:
        read_result(path, index)
        return True
    except BadChunkFile as e:
        print(f"{e}: computing chunk {index} again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return False


def run_task(args: BuildArgs, specs: list[SourceSpec], index: int, count: int) -> None:
    """Array task `index` of `count`: its chunks' results saved for the merge. Chunks already
    saved (by an earlier try of this task) are not recomputed."""
    out = Path(args.out)
    arr = out / ARRAY_DIR
    if (out / "manifest.json").exists() and not args.overwrite:
        raise UserError(f"{out}: holds a finished build; pass --overwrite to rebuild it")
    (arr / "chunks").mkdir(parents=True, exist_ok=True)
    recorded = {"args": args.recorded(), "tasks": count, "work_format": WORK_FORMAT}
    if (arr / "args.json").exists() and json.loads((arr / "args.json").read_text()) != recorded:
        raise UserError(f"{arr}: holds array results made with other arguments, another task "
                        "count or an older data_prep; remove it or use the same flags")
    atomic_write_json(arr / "args.json", recorded)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, args.cased)
    elif (arr / "tokenizer").is_dir():
        tok = load_saved(arr / "tokenizer")
    else:
        tok = train_vocabulary(specs, args.vocab_size, args.cased, args.workers,
                               args.worker_settings())
    tmp = arr / f".tokenizer.tmp{index}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    try:
        os.rename(tmp, arr / "tokenizer")  # the first task's copy stays; all are identical
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    total = 0

    def mine():
        nonlocal total  # every task reads every chunk: the last index seen is the chunk count
        for c in iter_chunks(specs):
            total = c.index + 1
            if c.index % count == index and not usable(_chunk_path(arr, c.index), c.index):
                yield c
    done = 0
    settings = args.worker_settings(arr / "tokenizer", token_dtype(len(tok)))
    for result in run_ordered(process_chunk, mine(), args.workers, settings):
        write_result(_chunk_path(arr, result.index), result)
        done += 1
    atomic_write_json(arr / f"task-{index}.json", {"chunks": total})
    print(f"{out}: task {index}/{count}: {done} chunk(s) of {total} computed", file=sys.stderr)


def ready(out: Path, recorded_args: dict) -> bool:
    """OUT holds array results made with these (recorded) arguments, every task finished."""
    arr = out / ARRAY_DIR
    try:
        recorded = json.loads((arr / "args.json").read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("args") != recorded_args or recorded.get("work_format") != WORK_FORMAT:
        return False  # an older data_prep's results: the merge computes the chunks itself
    return all((arr / f"task-{i}.json").exists() for i in range(recorded["tasks"]))


def saved_tokenizer(out: Path) -> Path:
    return out / ARRAY_DIR / "tokenizer"


def saved_results(out: Path, recorded_args: dict, done: int) -> tuple[int, set[int]] | None:
    """For the merge, when every task finished with these arguments: the chunk count and the
    chunks from `done` on whose files are missing or bad (named in a message; the merge computes
    those itself); else None. `saved_result` then reads the others in chunk order."""
    if not ready(out, recorded_args):
        return None
    arr = out / ARRAY_DIR
    total = json.loads((arr / "task-0.json").read_text())["chunks"]
    redo = {i for i in range(done, total) if not usable(_chunk_path(arr, i), i)}
    print(f"{out}: packing the array tasks' results ({total} chunks"
          + (f"; {len(redo)} computed here" if redo else "") + ")", file=sys.stderr)
    return total, redo


def saved_result(out: Path, index: int) -> ChunkResult:
    return read_result(_chunk_path(out / ARRAY_DIR, index), index)


def remove(out: Path) -> None:
    shutil.rmtree(out / ARRAY_DIR, ignore_errors=True)
