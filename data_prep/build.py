"""`python -m data_prep build`: sources -> tokenizer -> packed, shuffled, sharded sequences.

Everything in progress lives in OUT/.work; the finished output is moved into OUT and the manifest
is written last. The stages, each resumable after a kill:
  1. tokenizer  (given, or trained on the train documents), saved to .work/tokenizer
  2. pack       documents are read in a fixed order and cut into fixed chunks; worker processes
                clean and tokenize chunks; the main process packs their results in chunk order
                into two append-only files per split, and checkpoints (state.json) every few
                seconds. Chunking and packing do not depend on the number of workers, so the
                bytes are the same for any --workers.
  3. shard      a seeded global permutation of each split, written shard by shard.
  4. finalize   .work/final/* moved into OUT, manifest.json written, .work removed.

As a Slurm array (slurm/prep_data.sh), `--task I/N` runs only the costly part of stage 2 for the
chunks whose index is I modulo N, saving each chunk's result in OUT/.array/chunks/; the merge
(the plain command afterwards) packs those results instead of recomputing them, so its output is
byte-identical to a one-machine build with the same flags.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .files import atomic_write_json, sha256_file
from .pack import BOUNDARY_FORMAT, SplitPacker, token_dtype
from .sources import DataPrepError, SourceSpec, iter_source, parse_spec, wiki_page
from .wikitext import WikiCleaner
from .tokenizer import check_tokenizer, load_saved, load_tokenizer, train_tokenizer

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
CHUNK_DOCS = 512
CHUNK_CHARS = 1 << 20
# How often the pack stage saves its state (seconds); tests shorten it to kill builds mid-way.
CHECKPOINT_SECONDS = float(os.environ.get("DATA_PREP_CHECKPOINT_SECONDS", "5"))
ARRAY_DIR = ".array"  # OUT/.array: what array tasks computed for the merge


def embedded_corpus() -> str:
    """The real (shortened) English Wikipedia dump that ships in gensim's test data."""
    try:
        import gensim
    except ImportError as e:
        raise DataPrepError("the embedded default corpus needs the package gensim "
                            "(pip install -r requirements.txt)") from e
    return "wikipedia:" + str(Path(gensim.__file__).parent / "test" / "test_data" /
                              "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")


@dataclass
class BuildArgs:
    out: Path
    sources: list[str] = field(default_factory=list)
    seq_len: int = 128
    vocab_size: int | None = None
    tokenizer: str | None = None
    cased: bool = False
    workers: int = os.cpu_count() or 1
    seed: int = 0
    val_fraction: float = 0.005
    shard_size: int = 1 << 17
    overwrite: bool = False
    task: str | None = None  # "I/N": one Slurm array task's share of the chunks

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
            raise DataPrepError(f"--task {self.task}: expected I/N with 0 <= I < N")
        return i, n

    def check(self) -> list[SourceSpec]:
        if not self.sources:
            self.sources = [embedded_corpus()]
        if self.vocab_size is None and self.tokenizer is None:
            self.tokenizer = "bert-base-uncased"
        if self.vocab_size is not None and self.tokenizer is not None:
            raise DataPrepError("give --vocab-size or --tokenizer, not both")
        if not 8 <= self.seq_len <= 1 << 16:
            raise DataPrepError(f"--seq-len {self.seq_len}: must be between 8 and 65536")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataPrepError(f"--val-fraction {self.val_fraction}: must be in [0, 1)")
        if self.shard_size < 1:
            raise DataPrepError(f"--shard-size {self.shard_size}: must be at least 1 sequence")
        if self.workers < 1:
            raise DataPrepError(f"--workers {self.workers}: must be at least 1")
        self.task_slice()
        if self.vocab_size is not None and self.vocab_size < 100:
            raise DataPrepError(f"--vocab-size {self.vocab_size}: too small for WordPiece")
        specs = [parse_spec(s) for s in self.sources]
        for s in specs:
            if s.kind != "hf" and not Path(s.target).exists():
                raise DataPrepError(f"--source {s.spec}: {s.target}: no such file or directory")
        return specs


# ------------------------------------------------------------------ chunks and workers

def iter_chunks(specs: list[SourceSpec]) -> Iterator[dict]:
    """Fixed-size chunks of reader events (document pieces, dump pages), each chunk from one
    source, with the reader's counts."""
    index = 0
    for s, spec in enumerate(specs):
        items: list[tuple] = []
        stats: Counter = Counter()
        chars = 0
        for ev in iter_source(spec):
            if ev[0] in ("doc", "page"):
                items.append(ev)
                chars += len(ev[2])
                if ev[0] == "page" or ev[3]:  # a page, or a document's first piece
                    stats["documents_read"] += 1
            elif ev[0] == "skip":
                stats["documents_read"] += 1
                stats["skip:" + ev[1]] += 1
            else:
                stats["fix:" + ev[1]] += 1
            if len(items) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                yield {"index": index, "source": s, "items": items, "stats": stats}
                index += 1
                items, stats, chars = [], Counter(), 0
        if items or stats:
            yield {"index": index, "source": s, "items": items, "stats": stats}
            index += 1


_worker: dict = {}


def _init_worker(tokenizer_json: str, seed: int, val_fraction: float, tokenize: bool,
                 dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _worker.update(tokenizer=Tokenizer.from_file(tokenizer_json) if tokenize else None, seed=seed,
                   val_fraction=val_fraction, cleaners={}, dtype=dtype)


def is_validation(key: str, seed: int, val_fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2.0 ** 64


def _documents(chunk: dict) -> tuple[list[tuple], list[str], Counter]:
    """A chunk's document pieces (key, first, last) and their clean texts; pages are parsed
    here, and what that skips or repairs is counted."""
    stats = Counter(chunk["stats"])
    docs, texts = [], []
    for item in chunk["items"]:
        for ev in (wiki_page(*item[1:]) if item[0] == "page" else (item,)):
            if ev[0] != "doc":
                stats[f"{ev[0]}:{ev[1]}"] += 1
                continue
            _, key, text, first, last, wiki = ev
            if wiki is not None:
                cleaner = _worker["cleaners"].get(wiki)
                if cleaner is None:
                    cleaner = _worker["cleaners"][wiki] = WikiCleaner(set(wiki))
                text = cleaner.clean(text)
            docs.append((key, first, last))
            texts.append(text)
    return docs, texts, stats


def process_chunk(chunk: dict) -> dict:
    """Worker: clean and tokenize one chunk. Returns per piece (is_validation, ids, first, last)."""
    docs, texts, stats = _documents(chunk)
    encodings = _worker["tokenizer"].encode_batch(texts, add_special_tokens=False)
    pieces = []
    for (key, first, last), enc in zip(docs, encodings):
        val = is_validation(key, _worker["seed"], _worker["val_fraction"])
        pieces.append((val, np.array(enc.ids, dtype=_worker["dtype"]), first, last))
    return {"index": chunk["index"], "source": chunk["source"], "pieces": pieces, "stats": stats}


def clean_chunk(chunk: dict) -> list[str]:
    """Worker: the cleaned train-split texts of one chunk (for training a vocabulary)."""
    docs, texts, _ = _documents(chunk)
    return [t for (key, *_), t in zip(docs, texts)
            if not is_validation(key, _worker["seed"], _worker["val_fraction"])]


def run_ordered(fn, chunks: Iterator[dict], workers: int, init_args: tuple) -> Iterator:
    """fn over chunks, results in chunk order, at most a few chunks in flight (bounded memory).
    One worker runs in this process."""
    if workers == 1:
        _init_worker(*init_args)
        for c in chunks:
            yield fn(c)
        return
    # fork: workers inherit the imported modules (no start-up cost) and callers need no
    # `if __name__ == "__main__"` guard; the workers touch no thread-owned state of the parent.
    ctx = mp.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=init_args) as pool:
        window: deque = deque()
        for c in chunks:
            window.append(pool.submit(fn, c))
            if len(window) >= 2 * workers + 2:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


# ------------------------------------------------------------------ the build

class Build:
    def __init__(self, args: BuildArgs):
        self.args = args
        self.specs = args.check()
        self.out = Path(args.out)
        self.work = self.out / ".work"
        self.state_path = self.work / "state.json"
        self.t0 = time.time()

    def run(self) -> dict | None:
        if self.args.task is not None:
            return self.run_task(*self.args.task_slice())
        if self._finished():
            print(f"{self.out}: already built with these arguments (manifest.json); nothing to do",
                  file=sys.stderr)
            return json.loads((self.out / "manifest.json").read_text())
        # A bad --tokenizer fails here, before anything in OUT is touched.
        given = load_tokenizer(self.args.tokenizer, self.args.cased) if self.args.tokenizer else None
        self.state = self._open_work()
        tok = self._tokenizer(given)
        self.vocab_size = len(tok)
        self.ids = tok.special_ids()
        self.special_strings = tok.special
        self.dtype = token_dtype(self.vocab_size)
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
            raise DataPrepError(f"{self.out}: holds a finished build made with other arguments; "
                                "pass --overwrite to replace it")
        return False

    def _open_work(self) -> dict:
        fresh = {"args": self.args.recorded(), "stage": "tokenizer", "chunks_done": 0,
                 "splits": {}, "sources": [{} for _ in self.specs]}
        if self.out.exists() and not (self.out / "manifest.json").exists() \
                and not self.state_path.exists() and any(p.name not in (".work", ARRAY_DIR) for p in self.out.iterdir()) \
                and not self.args.overwrite:
            raise DataPrepError(f"{self.out}: exists and is not a data_prep output; pass --overwrite "
                                "or choose another --out")
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            if state.get("args") == fresh["args"]:
                print(f"{self.out}: resuming an unfinished build at stage {state['stage']!r}",
                      file=sys.stderr)
                return state
            if not self.args.overwrite:
                raise DataPrepError(f"{self.out}: holds an unfinished build with other arguments; "
                                    "pass --overwrite to discard it, or rerun that build's command")
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        atomic_write_json(self.state_path, fresh)
        return fresh

    def _save(self, **changes) -> None:
        self.state.update(changes)
        atomic_write_json(self.state_path, self.state)

    # -- stage 1
    def _tokenizer(self, given):
        path = self.work / "tokenizer"
        if self.state["stage"] != "tokenizer":
            tok = load_saved(path)
            check_tokenizer(tok, str(path))
            return tok
        if given is not None:
            tok = given
        elif self._array_ready() and (self.out / ARRAY_DIR / "tokenizer").is_dir():
            tok = load_saved(self.out / ARRAY_DIR / "tokenizer")  # trained by the array tasks
        else:
            tok = self._train_tokenizer()
        tok.save(path)
        self._save(stage="pack")
        return tok

    def _train_tokenizer(self):
        print(f"training a WordPiece vocabulary of {self.args.vocab_size} on the train split",
              file=sys.stderr)
        texts = (t for batch in run_ordered(clean_chunk, iter_chunks(self.specs), self.args.workers,
                                            self._init_args(tokenize=False)) for t in batch)
        return train_tokenizer(texts, self.args.vocab_size, self.args.cased)

    def _init_args(self, tokenize: bool, tokenizer_dir: Path | None = None) -> tuple:
        return (str((tokenizer_dir or self.work / "tokenizer") / "tokenizer.json"), self.args.seed,
                self.args.val_fraction, tokenize, np.dtype(self.dtype).str if tokenize else "<u4")

    # -- Slurm array tasks (stage 2's costly part, a slice each) and what the merge reads
    def run_task(self, index: int, count: int) -> None:
        arr = self.out / ARRAY_DIR
        if (self.out / "manifest.json").exists() and not self.args.overwrite:
            raise DataPrepError(f"{self.out}: holds a finished build; pass --overwrite to rebuild it")
        (arr / "chunks").mkdir(parents=True, exist_ok=True)
        recorded = {"args": self.args.recorded(), "tasks": count}
        if (arr / "args.json").exists() and json.loads((arr / "args.json").read_text()) != recorded:
            raise DataPrepError(f"{arr}: holds array results made with other arguments or another task "
                                "count; remove it or use the same flags")
        atomic_write_json(arr / "args.json", recorded)
        given = load_tokenizer(self.args.tokenizer, self.args.cased) if self.args.tokenizer else None
        tok = given if given is not None else (load_saved(arr / "tokenizer") if (arr / "tokenizer").is_dir()
                                                else self._train_tokenizer())
        self.dtype = token_dtype(len(tok))
        tmp = arr / f".tokenizer.tmp{index}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save(tmp)
        try:
            os.rename(tmp, arr / "tokenizer")  # the first task's copy stays; all are identical
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        total = 0

        def mine():
            nonlocal total
            for c in iter_chunks(self.specs):
                total = c["index"] + 1
                if c["index"] % count == index and not (arr / "chunks" / f"{c['index']:08d}.pkl").exists():
                    yield c
        done = 0
        for result in run_ordered(process_chunk, mine(), self.args.workers,
                                  self._init_args(True, arr / "tokenizer")):
            path = arr / "chunks" / f"{result['index']:08d}.pkl"
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
            os.replace(tmp, path)
            done += 1
        atomic_write_json(arr / f"task-{index}.json", {"chunks": total})
        print(f"{self.out}: task {index}/{count}: {done} chunk(s) of {total} computed", file=sys.stderr)
        return None

    def _array_ready(self) -> bool:
        """Array results made with these arguments, every task finished."""
        arr = self.out / ARRAY_DIR
        try:
            recorded = json.loads((arr / "args.json").read_text())
        except (OSError, ValueError):
            return False
        if recorded.get("args") != self.args.recorded():
            return False
        return all((arr / f"task-{i}.json").exists() for i in range(recorded["tasks"]))

    def _chunk_results(self, done: int):
        """Stage 2's results in chunk order: the array tasks' files when they are all there,
        else computed here."""
        arr = self.out / ARRAY_DIR
        if self._array_ready():
            total = json.loads((arr / "task-0.json").read_text())["chunks"]
            paths = [arr / "chunks" / f"{i:08d}.pkl" for i in range(done, total)]
            if all(p.exists() for p in paths):
                print(f"{self.out}: packing the array tasks' results ({total} chunks)", file=sys.stderr)
                for p in paths:
                    yield pickle.loads(p.read_bytes())
                return
        todo = (c for c in iter_chunks(self.specs) if c["index"] >= done)
        yield from run_ordered(process_chunk, todo, self.args.workers, self._init_args(True))

    # -- stage 2
    def _pack(self) -> None:
        from tqdm import tqdm

        packers = {name: SplitPacker(self.work, name, self.args.seq_len, self.ids, self.dtype,
                                     self.state["splits"].get(name)) for name in SPLITS}
        sources = [Counter(s) for s in self.state["sources"]]
        done = self.state["chunks_done"]
        bar = tqdm(desc="pack", unit=" docs", unit_scale=True, smoothing=0.05, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        tokens0 = sum(p.num_tokens for p in packers.values())
        last_save = time.time()
        for result in self._chunk_results(done):
            stats = sources[result["source"]]
            stats.update(result["stats"])
            for val, ids, first, last in result["pieces"]:
                kept = packers["validation" if val else "train"].add(ids, first, last)
                if kept is True:
                    stats["documents_kept"] += 1
                    stats["split:" + ("validation" if val else "train")] += 1
                elif kept is False:
                    stats["skip:empty"] += 1
            for p in packers.values():
                p.flush()
            done = result["index"] + 1
            bar.update(result["stats"].get("documents_read", 0))
            tokens = sum(p.num_tokens for p in packers.values()) - tokens0
            bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tokens/s",
                                refresh=False)
            if time.time() - last_save > CHECKPOINT_SECONDS:
                self._checkpoint(packers, sources, done)
                last_save = time.time()
        bar.close()
        for p in packers.values():
            p.flush(final=True)
        self._checkpoint(packers, sources, done, stage="shard")
        for p in packers.values():
            p.close()

    def _checkpoint(self, packers, sources, done, stage: str = "pack") -> None:
        self._save(stage=stage, chunks_done=done,
                   splits={name: p.state() for name, p in packers.items()},
                   sources=[dict(s) for s in sources])

    # -- stage 3
    def _shard(self) -> None:
        if self.state["splits"]["train"]["num_sequences"] == 0:
            raise DataPrepError("no usable document in " + ", ".join(s.spec for s in self.specs) +
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

    # -- stage 4
    def _finalize(self) -> dict:
        final = self.work / "final"
        splits = {}
        for name in SPLITS:
            st = self.state["splits"][name]
            splits[name] = {"num_sequences": st["num_sequences"], "num_tokens": st["num_tokens"],
                            "shards": self.state["shards"][name]}
        sources = []
        for spec, st in zip(self.specs, self.state["sources"]):
            sources.append({
                "spec": spec.spec, "kind": spec.kind,
                "documents_read": st.get("documents_read", 0),
                "documents_kept": st.get("documents_kept", 0),
                "documents_by_split": {s: st.get("split:" + s, 0) for s in SPLITS},
                "skipped": {k[5:]: v for k, v in sorted(st.items()) if k.startswith("skip:")},
                "repaired": {k[4:]: v for k, v in sorted(st.items()) if k.startswith("fix:")},
            })
        manifest = {
            "format_version": FORMAT_VERSION, "seq_len": self.args.seq_len,
            "vocab_size": self.vocab_size, "dtype": np.dtype(self.dtype).name,
            "tokenizer": "tokenizer", "special_tokens": self.ids,
            "special_token_strings": self.special_strings, "seed": self.args.seed,
            "args": self.args.recorded(), "boundaries_format": BOUNDARY_FORMAT,
            "sources": sources, "splits": splits,
        }
        for name in ("tokenizer", *SPLITS):
            src = self.work / name if name == "tokenizer" else final / name
            if src.exists():  # else moved already by a run that was killed after it
                if (self.out / name).exists():
                    shutil.rmtree(self.out / name)
                os.replace(src, self.out / name)
        atomic_write_json(self.out / "manifest.json", manifest)
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.rmtree(self.out / ARRAY_DIR, ignore_errors=True)
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


def _save_npy(path: Path, array: np.ndarray) -> str:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return sha256_file(path)


def build(args: BuildArgs) -> dict:
    return Build(args).run()
