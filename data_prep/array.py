"""The build as a Slurm array (slurm/prep_data.sh): `--task I/N` runs only the costly part of the
pack stage (cleaning and tokenizing) for the chunks whose index is I modulo N, and saves each
chunk's result in OUT/.array/chunks/. The merge (the same command without --task) packs those
results instead of recomputing them, so its output is byte-identical to a one-machine build with
the same flags.

OUT/.array holds args.json (the recorded arguments and task count), tokenizer/ (the first task's;
all are identical with a given --tokenizer), chunks/NNNNNNNN.pkl (ChunkResult) and task-I.json
(written when task I has finished, with the total chunk count).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

from .args import BuildArgs
from .chunks import ChunkResult, iter_chunks
from .files import atomic_write_json
from .pack import token_dtype
from .sources import SourceSpec
from .tokenizer import load_saved, load_tokenizer
from .workers import process_chunk, run_ordered, train_vocabulary

ARRAY_DIR = ".array"
# The unfinished build's own files (OUT/.work/state.json, OUT/.array/): 2 since reader counts and
# chunk results became dataclasses. Work of another format is redone, never misread.
WORK_FORMAT = 2


def _chunk_path(arr: Path, index: int) -> Path:
    return arr / "chunks" / f"{index:08d}.pkl"


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
            if c.index % count == index and not _chunk_path(arr, c.index).exists():
                yield c
    done = 0
    settings = args.worker_settings(arr / "tokenizer", token_dtype(len(tok)))
    for result in run_ordered(process_chunk, mine(), args.workers, settings):
        path = _chunk_path(arr, result.index)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
        os.replace(tmp, path)
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


def saved_results(out: Path, recorded_args: dict, done: int) -> Iterator[ChunkResult] | None:
    """For the merge: the array tasks' results from chunk `done` on, in chunk order, when every
    task finished with these arguments and every result is there; else None."""
    if not ready(out, recorded_args):
        return None
    arr = out / ARRAY_DIR
    total = json.loads((arr / "task-0.json").read_text())["chunks"]
    paths = [_chunk_path(arr, i) for i in range(done, total)]
    if not all(p.exists() for p in paths):
        return None
    print(f"{out}: packing the array tasks' results ({total} chunks)", file=sys.stderr)
    return (pickle.loads(p.read_bytes()) for p in paths)


def remove(out: Path) -> None:
    shutil.rmtree(out / ARRAY_DIR, ignore_errors=True)
