"""`python -m data_prep build`: sources -> tokenizer -> packed, shuffled, sharded sequences.

Everything in progress lives in OUT/.work; the finished output is moved into OUT and the manifest
is written last. The stages, each resumable after a kill:
  1. tokenizer  (given, or trained on word counts of every unit), saved to .work/tokenizer
  2. units      the input is cut into units (units.py: files, bz2 streams, byte ranges, dataset
                shards) from the input alone; worker processes read, clean and tokenize units
                (workers.py), and each unit's result is saved in .work/units/ (a file written
                aside and renamed: a kill loses at most the units in flight).
  3. split      the validation documents chosen from every document's hash and token count
                (split.py), saved to .work/validation.npy.
  4. pack       the units' results, in unit order, packed into two append-only files per split
                (pack.py), checkpointed (state.json) every few seconds.
  5. shard      a seeded global permutation of each split, written shard by shard.
  6. finalize   .work/final/* moved into OUT, manifest.json written, .work removed.
Units and packing do not depend on the number of workers, so the bytes are the same for any
--workers. Stages 1-6 hold OUT/.lock (lock.py): one build or array merge writes an OUT at a time.

As a Slurm array, stage 1's word counting and stage 2 run in the array tasks instead, each
reading only its units (array.py); the merge finds their results in OUT/.array/units/.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.errors import UserError, writing

from . import array
from .args import BuildArgs
from .chunks import UnitResult
from .events import SourceCounts
from .files import atomic_write_json, sha256_file
from .lock import NAME as LOCK
from .lock import out_lock
from .pack import BOUNDARY_FORMAT, SplitPacker, token_dtype
from .sources import SourceSpec, plan_units
from .split import choose_validation
from .tokenizer import TokenizerFiles, check_tokenizer, load_saved, load_tokenizer
from .vocab import train_wordpiece
from .workers import Progress, process_unit, run_ordered, vocabulary_counts

__all__ = ["BuildArgs", "build"]

# 2: --val-fraction is a fraction of tokens met by whole documents (split.py; it was each
# document's chance), a JSONL line without an "id" is keyed by its byte offset (was its line
# number), an hf: row without one by its shard and row in it. Readers take 1 and 2.
FORMAT_VERSION = 2
SPLITS = ("train", "validation")
# How often the pack stage saves its state (seconds); tests shorten it to kill builds mid-way.
CHECKPOINT_SECONDS = float(os.environ.get("DATA_PREP_CHECKPOINT_SECONDS", "5"))


def build(args: BuildArgs) -> dict | None:
    """The whole build (returns the manifest), or with args.task one array task's share (None)."""
    specs = args.check()
    if args.task is not None:
        array.run_task(args, specs, *args.task_slice())
        return None
    return Build(args, specs).run()


class Build:
    def __init__(self, args: BuildArgs, specs: list[SourceSpec]):
        self.args = args
        self.specs = specs
        self.out = Path(args.out)
        self.work = self.out / ".work"
        self.state_path = self.work / "state.json"
        self.t0 = time.time()

    def run(self) -> dict:
        if self._finished():
            print(f"{self.out}: already built with these arguments (manifest.json); nothing to do",
                  file=sys.stderr)
            if (self.out / LOCK).exists() and (self.out / LOCK).stat().st_size:
                with out_lock(self.out):  # killed after the manifest: its holder's name cleared
                    pass
            return json.loads((self.out / "manifest.json").read_text())
        # A bad --tokenizer fails here, before anything in OUT is touched.
        given = load_tokenizer(self.args.tokenizer, self.args.cased) if self.args.tokenizer else None
        self.units = plan_units(self.specs, self.args.unit_bytes())
        with out_lock(self.out):  # a second build or a requeued merge on OUT stops here
            self.state = self._open_work()
            tok = self._tokenizer(given)
            self.vocab_size = len(tok)
            self.ids = tok.special_ids()
            self.special_strings = tok.special
            self.dtype = token_dtype(self.vocab_size)
            # Where the units' results are: the array tasks' when they all finished, else our own.
            self.units_dir = (array.units_dir(self.out) if array.ready(self.out, self.args.recorded())
                              else self.work / "units")
            if self.state["stage"] == "units":
                self._tokenize()
            if self.state["stage"] == "split":
                self._split()
            if self.state["stage"] == "pack":
                self._pack()
            if self.state["stage"] == "shard":
                self._shard()
            manifest = self._finalize()
        self._summary(manifest)
        return manifest

    # -- OUT and the work directory
    def _finished(self) -> bool:
        manifest = self.out / "manifest.json"
        if not manifest.exists():
            return False
        try:
            recorded = json.loads(manifest.read_text()).get("args")
        except ValueError:
            recorded = None
        if recorded == self.args.recorded() and not self.args.overwrite:
            shutil.rmtree(self.work, ignore_errors=True)  # a kill after the manifest was written
            return True
        if not self.args.overwrite:
            raise UserError(f"{self.out}: holds a finished build made with other arguments; "
                            "pass --overwrite to replace it")
        return False

    def _open_work(self) -> dict:
        fresh = {"args": self.args.recorded(), "work_format": array.WORK_FORMAT, "stage": "tokenizer", "units_done": 0,
                 "splits": {}, "sources": [SourceCounts().to_json() for _ in self.specs]}
        if self.out.exists() and not (self.out / "manifest.json").exists() \
                and not self.state_path.exists() \
                and any(p.name not in (".work", array.ARRAY_DIR, LOCK) for p in self.out.iterdir()) \
                and not self.args.overwrite:
            raise UserError(f"{self.out}: exists and is not a data_prep output; pass --overwrite "
                            "or choose another --out")
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("args") == fresh["args"] and state.get("work_format") != array.WORK_FORMAT:
                # its state and chunk results are an older format: the work is redone
                print(f"{self.out}: an unfinished build left by an older data_prep; starting it again",
                      file=sys.stderr)
            elif state.get("args") == fresh["args"]:
                print(f"{self.out}: resuming an unfinished build at stage {state['stage']!r}",
                      file=sys.stderr)
                return state
            elif not self.args.overwrite:
                raise UserError(f"{self.out}: holds an unfinished build with other arguments; "
                                "pass --overwrite to discard it, or rerun that build's command")
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        atomic_write_json(self.state_path, fresh)
        return fresh

    def _save(self, **changes) -> None:
        self.state.update(changes)
        atomic_write_json(self.state_path, self.state)

    # -- stage 1
    def _tokenizer(self, given: TokenizerFiles | None) -> TokenizerFiles:
        path = self.work / "tokenizer"
        if self.state["stage"] != "tokenizer":
            tok = load_saved(path)
            check_tokenizer(tok, str(path))
            return tok
        if given is not None:
            tok = given
        elif array.ready(self.out, self.args.recorded()) and array.saved_tokenizer(self.out).is_dir():
            tok = load_saved(array.saved_tokenizer(self.out))  # trained by the array tasks
        else:
            counts = vocabulary_counts(self.units, self.args.workers, self.args.worker_settings(),
                                       saved=lambda i: array.saved_counts(self.out, self.args.recorded(), i))
            tok = train_wordpiece(counts, self.args.vocab_size, self.args.cased)
        tok.save(path)
        self._save(stage="units")
        return tok

    # -- stage 2
    def _settings(self):
        return self.args.worker_settings(self.work / "tokenizer", self.dtype)

    def _tokenize(self) -> None:
        """Every unit's result saved: those missing (or, of the array's, bad) computed here."""
        directory = self.units_dir
        if directory == self.work / "units":
            directory.mkdir(exist_ok=True)
            todo = [u for u in self.units if not array.unit_path(directory, u.index).exists()]
        else:
            redo = array.units_to_redo(self.out, len(self.units))
            todo = [u for u in self.units if u.index in redo]
        progress = Progress("read, tokenize", len(self.units), len(self.units) - len(todo))
        for result in run_ordered(process_unit, todo, self.args.workers, self._settings()):
            array.write_result(array.unit_path(directory, result.index), result)
            progress.add_result(result)
        progress.close()
        self._save(stage="split")

    def _result(self, unit) -> UnitResult:
        """A unit's saved result; one found bad (the disk changed it since) is computed again."""
        path = array.unit_path(self.units_dir, unit.index)
        try:
            return array.read_result(path, unit.index)
        except array.BadUnitFile as e:
            print(f"{e}: computing unit {unit.index} again", file=sys.stderr)
            result = next(run_ordered(process_unit, [unit], 1, self._settings()))
            array.write_result(path, result)
            return result

    # -- stage 3
    def _split(self) -> None:
        docs, tokens = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)]
        for unit in self.units:
            try:
                d, n = array.read_docs(array.unit_path(self.units_dir, unit.index), unit.index)
            except array.BadUnitFile:
                pieces = self._result(unit).pieces  # says what is wrong, and computes it again
                d = np.array([p.doc for p in pieces], dtype=np.uint64)
                n = np.array([len(p.ids) for p in pieces], dtype=np.int64)
            docs.append(d)
            tokens.append(n)
        chosen, figures = choose_validation(np.concatenate(docs), np.concatenate(tokens),
                                            self.args.val_fraction, ", ".join(s.spec for s in self.specs))
        _write_npy(self.work / "validation.npy", chosen)
        self._save(stage="pack", validation=figures)

    # -- stage 4
    def _pack(self) -> None:
        packers = {name: SplitPacker(self.work, name, self.args.seq_len, self.ids, self.dtype,
                                     self.state["splits"].get(name)) for name in SPLITS}
        counts = [SourceCounts.from_json(s) for s in self.state["sources"]]
        chosen = np.load(self.work / "validation.npy")
        done = self.state["units_done"]
        bar = tqdm(desc="pack", total=len(self.units), initial=done, unit=" units", smoothing=0.05,
                   file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        last_save = time.time()
        for unit in self.units[done:]:
            result = self._result(unit)
            self._once_per_document(result)
            source = counts[result.source]
            source.add(result.counts)
            held_out = np.isin(np.array([p.doc for p in result.pieces], dtype=np.uint64), chosen)
            for piece, validation in zip(result.pieces, held_out):
                split = "validation" if validation else "train"
                kept = packers[split].add(piece.ids, piece.first, piece.last)
                if kept is True:
                    source.keep(split)
                elif kept is False:
                    source.skip("empty")
            for p in packers.values():
                p.flush()
            done = unit.index + 1
            bar.update()
            if time.time() - last_save > CHECKPOINT_SECONDS:
                self._checkpoint(packers, counts, done)
                last_save = time.time()
        bar.close()
        for p in packers.values():
            p.flush(final=True)
        self._checkpoint(packers, counts, done, stage="shard")
        for p in packers.values():
            p.close()

    def _once_per_document(self, result: UnitResult) -> None:
        """A text file read in ranges is one document: its ranges' repairs (invalid UTF-8, NUL
        bytes) are counted once for it, at its last range, as a whole read counts them."""
        unit = self.units[result.index]
        if unit.kind != "lines" or self.specs[unit.source].kind != "text":
            return
        pending = set(self.state.get("pending_repairs", [])) | set(result.counts.repaired)
        result.counts.repaired = {}
        if unit.part == unit.parts - 1:
            for reason in sorted(pending):
                result.counts.repair(reason)
            pending = set()
        self.state["pending_repairs"] = sorted(pending)

    def _checkpoint(self, packers: dict[str, SplitPacker], counts: list[SourceCounts], done: int,
                    stage: str = "pack") -> None:
        self._save(stage=stage, units_done=done,
                   splits={name: p.state() for name, p in packers.items()},
                   sources=[c.to_json() for c in counts])

    # -- stage 5
    def _shard(self) -> None:
        if self.state["splits"]["train"]["num_sequences"] == 0:
            raise UserError("no usable document in " + ", ".join(s.spec for s in self.specs) +
                            " (every document was skipped or empty; see the counts above)")
        final = self.work / "final"
        shards = self.state.setdefault("shards", {})
        for k, name in enumerate(SPLITS):
            packer = SplitPacker(self.work, name, self.args.seq_len, self.ids, self.dtype,
                                 self.state["splits"][name])
            packer.close()
            tokens, bits = packer.arrays()
            n = len(tokens)
            order = np.random.default_rng([self.args.seed, k]).permutation(n)
            (final / name).mkdir(parents=True, exist_ok=True)
            done = shards.setdefault(name, [])
            for i in range(len(done), -(-n // self.args.shard_size)):
                idx = order[i * self.args.shard_size:(i + 1) * self.args.shard_size]
                # The memory-mapped rows are read in file order (sequential I/O) and placed in
                # shuffled order.
                sort = np.argsort(idx, kind="stable")
                rows, rbits = np.empty((len(idx), tokens.shape[1]), tokens.dtype), np.empty(
                    (len(idx), bits.shape[1]), np.uint8)
                rows[sort], rbits[sort] = tokens[idx[sort]], bits[idx[sort]]
                entry = {"path": f"{name}/{i:05d}.npy", "num_sequences": len(idx)}
                entry["sha256"] = _save_npy(final / entry["path"], rows)
                entry["boundaries"] = {"path": f"{name}/{i:05d}.bounds.npy"}
                entry["boundaries"]["sha256"] = _save_npy(final / entry["boundaries"]["path"], rbits)
                entry["num_tokens"] = int((rows != self.ids["pad"]).sum())
                done.append(entry)
                self._save()
            del tokens, bits
        self._save(stage="finalize")

    # -- stage 6
    def _finalize(self) -> dict:
        final = self.work / "final"
        splits = {}
        for name in SPLITS:
            st = self.state["splits"][name]
            splits[name] = {"num_sequences": st["num_sequences"], "num_tokens": st["num_tokens"],
                            "shards": self.state["shards"][name]}
        sources = [SourceCounts.from_json(st).manifest_entry(spec.spec, spec.kind, SPLITS)
                   for spec, st in zip(self.specs, self.state["sources"])]
        manifest = {
            "format_version": FORMAT_VERSION, "seq_len": self.args.seq_len,
            "vocab_size": self.vocab_size, "dtype": np.dtype(self.dtype).name,
            "tokenizer": "tokenizer", "special_tokens": self.ids,
            "special_token_strings": self.special_strings, "seed": self.args.seed,
            "args": self.args.recorded(), "boundaries_format": BOUNDARY_FORMAT,
            "sources": sources, "splits": splits, "validation_split": self.state["validation"],
        }
        for name in ("tokenizer", *SPLITS):
            src = self.work / name if name == "tokenizer" else final / name
            if src.exists():  # else moved already by a run that was killed after it
                if (self.out / name).exists():
                    shutil.rmtree(self.out / name)
                os.replace(src, self.out / name)
        atomic_write_json(self.out / "manifest.json", manifest)
        shutil.rmtree(self.work, ignore_errors=True)
        array.remove(self.out)
        return manifest

    def _summary(self, m: dict) -> None:
        dt = time.time() - self.t0
        lines = [f"built {self.out} in {dt:.1f}s"]
        for s in m["sources"]:
            skipped = ", ".join(f"{k} {v}" for k, v in s["skipped"].items()) or "none"
            repaired = ", ".join(f"{k} {v}" for k, v in s["repaired"].items()) or "none"
            lines.append(f"  {s['spec']}: read {s['documents_read']}, kept {s['documents_kept']}; "
                         f"skipped: {skipped}; repaired: {repaired}")
        total = 0
        for name in SPLITS:
            sp = m["splits"][name]
            total += sp["num_tokens"]
            lines.append(f"  {name}: {sp['num_sequences']:,} sequences of {m['seq_len']}, "
                         f"{sp['num_tokens']:,} tokens, {len(sp['shards'])} shard(s)")
        docs = sum(s["documents_read"] for s in m["sources"])
        lines.append(f"  {docs / dt:,.0f} documents/s, {total / dt:,.0f} tokens/s (this run, "
                     "including time before a resume is not counted)")
        print("\n".join(lines), file=sys.stderr)


def _save_npy(path: Path, data: np.ndarray) -> str:
    """A shard (tokens or boundaries), written; returns its SHA-256."""
    _write_npy(path, data)
    return sha256_file(path)


def _write_npy(path: Path, data: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with writing(path, partial=[tmp]):
        with open(tmp, "wb") as f:
            np.save(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
