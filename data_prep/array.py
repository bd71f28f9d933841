"""The build as a Slurm array (slurm/prep_data.sh): `--task I/N` reads, cleans and tokenizes only
the units (units.py) whose index is I modulo N, and saves each unit's result in
OUT/.array/units/. The merge (the same command without --task) packs those results instead of
computing them, so its output is byte-identical to a one-machine build with the same flags. A
task reads no other unit's bytes.

With --vocab-size the vocabulary needs every unit's word counts, so the array runs twice: a task
first counts its units' words (OUT/.array/counts/), and when some unit is not counted yet it stops
there; run again (slurm/prep_data.sh submits the second pass), every task finds all counts, trains
the same vocabulary from them (vocab.py: deterministic) and tokenizes its units.

OUT/.array holds args.json (the recorded arguments and task count), tokenizer/ (the first task's;
all are identical), counts/NNNNNNNN.json (a unit's word counts, checksummed), units/NNNNNNNN.npz
(a UnitResult as plain arrays and JSON, checksummed: nothing on disk can run code when loaded) and
task-I.json (written when task I has finished: the unit count and the bytes it read). A unit file
that is truncated, corrupt or not one is recomputed, with a message naming it: by its task when
the task runs again, else by the merge itself.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, writing

from .args import BuildArgs
from .chunks import Piece, UnitResult
from .events import SourceCounts
from .files import atomic_write_json
from .pack import token_dtype
from .sources import SourceSpec, plan_units
from .tokenizer import load_saved, load_tokenizer
from .vocab import add_counts, train_wordpiece
from .workers import Progress, process_unit, run_ordered, vocabulary_counts

ARRAY_DIR = ".array"
# The unfinished build's own files (OUT/.work/state.json, OUT/.array/): 2 since reader counts and
# chunk results became dataclasses, 3 since chunk results are npz + JSON instead of pickles, 4 since
# the work is counted in units, 5 since pieces carry their document's hash instead of its split.
# Work of another format is redone, never misread.
WORK_FORMAT = 5


class BadUnitFile(Exception):
    """A unit's file that cannot be used (the message names it and says why)."""


def units_dir(out: Path) -> Path:
    return out / ARRAY_DIR / "units"


def unit_path(directory: Path, index: int) -> Path:
    """Unit `index`'s result file in `directory` (the array's, or a one-machine build's own)."""
    return directory / f"{index:08d}.npz"


def _counts_path(arr: Path, index: int) -> Path:
    return arr / "counts" / f"{index:08d}.json"


def _digest(ids: np.ndarray, lengths: np.ndarray, flags: np.ndarray, docs: np.ndarray,
            meta: np.ndarray) -> np.ndarray:
    h = hashlib.sha256(ids.dtype.str.encode())
    for a in (ids, lengths, flags, docs, meta):
        h.update(np.ascontiguousarray(a).tobytes())
    return np.frombuffer(h.digest(), dtype=np.uint8)


def write_result(path: Path, result: UnitResult) -> None:
    """The result as arrays: every piece's token ids end to end, their lengths, their flags
    (first, last as bits 0-1), their documents' hashes, the index, source and counts as JSON, and
    a SHA-256 of it all; written aside and renamed."""
    pieces = result.pieces
    ids = np.concatenate([x.ids for x in pieces]) if pieces else np.zeros(0, dtype=np.uint16)
    lengths = np.array([len(x.ids) for x in pieces], dtype=np.int64)
    flags = np.array([x.first | x.last << 1 for x in pieces], dtype=np.uint8)
    docs = np.array([x.doc for x in pieces], dtype=np.uint64)
    meta = np.frombuffer(json.dumps({"index": result.index, "source": result.source, "bytes_read": result.bytes_read,
                                     "counts": result.counts.to_json()}).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, partial=[tmp]):
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, lengths=lengths, flags=flags, docs=docs, meta=meta,
                     sha256=_digest(ids, lengths, flags, docs, meta))
        os.replace(tmp, path)


def read_result(path: Path, index: int) -> UnitResult:
    """Unit `index`'s result from `path`, checked (loading never unpickles); BadUnitFile
    naming the file when it is missing, truncated, corrupt or of another chunk."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, lengths, flags, docs, meta, digest = (z[k] for k in ("ids", "lengths", "flags", "docs", "meta",
                                                                      "sha256"))
    except Exception as e:  # missing, truncated (zip errors), a foreign file, an object array
        raise BadUnitFile(f"{path}: not a readable unit file ({type(e).__name__}: {e})") from None
    kinds = (ids.dtype.kind in "iu", lengths.dtype == np.int64, flags.dtype == np.uint8, docs.dtype == np.uint64,
             meta.dtype == np.uint8, digest.dtype == np.uint8)
    if not all(kinds) or any(a.ndim != 1 for a in (ids, lengths, flags, docs, meta, digest)):
        raise BadUnitFile(f"{path}: not a unit file (arrays of unexpected types or shapes)")
    if not np.array_equal(digest, _digest(ids, lengths, flags, docs, meta)):
        raise BadUnitFile(f"{path}: checksum mismatch (the file is corrupt)")
    try:
        info = json.loads(meta.tobytes())
        source, counts, nbytes = int(info["source"]), SourceCounts.from_json(info["counts"]), int(info["bytes_read"])
        if info["index"] != index:
            raise ValueError(f"it holds unit {info['index']}")
    except (ValueError, KeyError, TypeError) as e:
        raise BadUnitFile(f"{path}: not unit {index}'s result ({e})") from None
    if not len(flags) == len(docs) == len(lengths) or (lengths < 0).any() or int(lengths.sum()) != len(ids):
        raise BadUnitFile(f"{path}: piece lengths do not add up to its tokens")
    ends = np.cumsum(lengths)
    pieces = [Piece(int(d), ids[e - n:e], bool(f & 1), bool(f & 2)) for d, f, n, e in zip(docs, flags, lengths, ends)]
    return UnitResult(index, source, pieces, counts, nbytes)


def read_docs(path: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit `index`'s pieces' document hashes and token counts, read alone (the split stage needs
    no more; the pack stage then reads the whole file and checks its checksum)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            docs, lengths = z["docs"], z["lengths"]
    except Exception as e:  # missing, truncated, foreign
        raise BadUnitFile(f"{path}: not a readable unit file ({type(e).__name__}: {e})") from None
    if docs.dtype != np.uint64 or lengths.dtype != np.int64 or docs.ndim != 1 or docs.shape != lengths.shape:
        raise BadUnitFile(f"{path}: not a unit file (arrays of unexpected types or shapes)")
    return docs, lengths


def usable(path: Path, index: int) -> bool:
    """Whether unit `index`'s file is there and sound; a bad one is removed, with a message."""
    if not path.exists():
        return False
    try:
        read_result(path, index)
        return True
    except BadUnitFile as e:
        print(f"{e}: computing unit {index} again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return False


def write_counts(path: Path, index: int, counts: dict[str, int]) -> None:
    body = json.dumps({"index": index, "counts": counts}, ensure_ascii=False, sort_keys=True)
    atomic_write_json(path, {"sha256": hashlib.sha256(body.encode()).hexdigest(), "body": body})


def read_counts(path: Path, index: int) -> dict[str, int] | None:
    """Unit `index`'s word counts, or None when the file is missing; a bad file is removed with a
    message (and the unit counted again)."""
    if not path.exists():
        return None
    try:
        outer = json.loads(path.read_text(encoding="utf-8"))
        body = outer["body"]
        if hashlib.sha256(body.encode()).hexdigest() != outer["sha256"]:
            raise ValueError("checksum mismatch (the file is corrupt)")
        inner = json.loads(body)
        if inner["index"] != index:
            raise ValueError(f"it holds unit {inner['index']}'s counts")
        return inner["counts"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        print(f"{path}: not unit {index}'s word counts ({e}): counting it again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None


def run_task(args: BuildArgs, specs: list[SourceSpec], index: int, count: int) -> None:
    """Array task `index` of `count`: its units' results saved for the merge. Units already
    saved (by an earlier try of this task) are not recomputed."""
    out = Path(args.out)
    arr = out / ARRAY_DIR
    if (out / "manifest.json").exists() and not args.overwrite:
        raise UserError(f"{out}: holds a finished build; pass --overwrite to rebuild it")
    units = plan_units(specs, args.unit_bytes())
    mine = [u for u in units if u.index % count == index]
    recorded = {"args": args.recorded(), "tasks": count, "work_format": WORK_FORMAT}
    if (arr / "args.json").exists() and json.loads((arr / "args.json").read_text()) != recorded:
        raise UserError(f"{arr}: holds array results made with other arguments, another task "
                        "count or an older data_prep; remove it or use the same flags")
    for d in ("units", "counts"):
        (arr / d).mkdir(parents=True, exist_ok=True)
    atomic_write_json(arr / "args.json", recorded)
    read = 0
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer, args.cased)
    elif (arr / "tokenizer").is_dir():
        tok = load_saved(arr / "tokenizer")
    else:
        total = vocabulary_counts(mine, args.workers, args.worker_settings(),
                                  saved=lambda i: read_counts(_counts_path(arr, i), i),
                                  save=lambda i, c: write_counts(_counts_path(arr, i), i, c))
        others = [u for u in units if u.index % count != index]
        missing = [u.index for u in others if not _counts_path(arr, u.index).exists()]
        if missing:
            print(f"{out}: task {index}/{count}: its {len(mine)} unit(s) counted; {len(missing)} unit(s) "
                  "of other tasks are not yet: run the tasks again once all have counted "
                  "(slurm/prep_data.sh submits that second pass) to train the vocabulary and tokenize",
                  file=sys.stderr)
            return
        for u in others:
            c = read_counts(_counts_path(arr, u.index), u.index)
            if c is None:
                raise UserError(f"{_counts_path(arr, u.index)}: unit {u.index}'s word counts went bad: "
                                "run its task again")
            add_counts(total, c)
        tok = train_wordpiece(total, args.vocab_size, args.cased)
    tmp = arr / f".tokenizer.tmp{index}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    try:
        os.rename(tmp, arr / "tokenizer")  # the first task's copy stays; all are identical
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    todo = [u for u in mine if not usable(unit_path(arr / "units", u.index), u.index)]
    settings = args.worker_settings(arr / "tokenizer", token_dtype(len(tok)))
    progress = Progress(f"task {index}/{count}: read, tokenize", len(mine), len(mine) - len(todo))
    for result in run_ordered(process_unit, todo, args.workers, settings):
        write_result(unit_path(arr / "units", result.index), result)
        read += result.bytes_read
        progress.add_result(result)
    progress.close()
    # What this run read (an earlier, killed try's units are not read again).
    atomic_write_json(arr / f"task-{index}.json", {"units": len(units), "bytes_read": read,
                                                   "computed": [u.index for u in todo]})
    print(f"{out}: task {index}/{count}: {len(todo)} of its {len(mine)} unit(s) computed "
          f"({read / 1e6:,.1f} MB read) of {len(units)} in all", file=sys.stderr)


def _recorded(out: Path, recorded_args: dict) -> dict | None:
    """OUT/.array/args.json if array tasks of this format ran there with these arguments."""
    try:
        recorded = json.loads((out / ARRAY_DIR / "args.json").read_text())
    except (OSError, ValueError):
        return None
    if recorded.get("args") != recorded_args or recorded.get("work_format") != WORK_FORMAT:
        return None  # an older data_prep's results: the merge computes the units itself
    return recorded


def ready(out: Path, recorded_args: dict) -> bool:
    """OUT holds array results made with these (recorded) arguments, every task finished."""
    recorded = _recorded(out, recorded_args)
    return recorded is not None and all((out / ARRAY_DIR / f"task-{i}.json").exists()
                                        for i in range(recorded["tasks"]))


def saved_tokenizer(out: Path) -> Path:
    return out / ARRAY_DIR / "tokenizer"


def saved_counts(out: Path, recorded_args: dict, index: int) -> dict[str, int] | None:
    """Unit `index`'s word counts if array tasks with these arguments counted it, else None."""
    if _recorded(out, recorded_args) is None:
        return None
    return read_counts(_counts_path(out / ARRAY_DIR, index), index)


def units_to_redo(out: Path, total: int) -> set[int]:
    """For the merge: the units whose files the tasks left missing or bad (named in a message;
    the merge computes those itself)."""
    redo = {i for i in range(total) if not usable(unit_path(units_dir(out), i), i)}
    print(f"{out}: merging the array tasks' results ({total} units"
          + (f"; {len(redo)} computed here" if redo else "") + ")", file=sys.stderr)
    return redo


def remove(out: Path) -> None:
    shutil.rmtree(out / ARRAY_DIR, ignore_errors=True)
