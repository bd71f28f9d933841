"""Benchmark of `python -m data_prep build` in its units-of-work design (a benchmark, not a test:
it prints a table with a target and pass/MISS per line and writes JSON; it asserts nothing).

    python -m bench.data_prep [--mb 24] [--dump-mb 150] [--grow 10] [--unit-mb 0.5]
                              [--index-lines 1000000] [--json bench/out/data_prep.json] [--quick]

Run it from the repository root, as a module: run as a script, this file's own directory would
come first on the import path and `import data_prep` would find this file instead of the package.
`--quick` is a smoke run (--mb 2 --dump-mb 8 --index-lines 100000: about a minute on 2 cores,
and its rates and ratios mean little: 2-4 units a build). The full run takes 10-15 minutes on
2 cores and about 1 GB in the temporary directory. Run it on an otherwise idle machine: the first
row reports the CPU other processes used meanwhile.

Every build runs in a child python that calls `data_prep.__main__.main([...])` (the default
`--tokenizer bert-base-uncased`), with the build's stages timed (wall and the main process's CPU;
STAGES lists those timed where the build has them) and, at exit, getrusage(RUSAGE_SELF) (the main
process) and RUSAGE_CHILDREN (the pool's workers, reaped by then); a psutil watcher samples the
RSS of the whole process tree. The workers' stage is "tokenize" (units read, cleaned, tokenized,
their results saved; "split" and "pack" follow in the main process) or, in a build without that
stage, "pack" (results packed as they arrive).

Wiki dumps. gensim's real English dump (the embedded corpus) is rewritten by
`data_prep.multistream.write_multistream` with its pages repeated (new titles and ids) to at least
--dump-mb MiB of XML: once as a multistream dump with its index, once as 4 single-stream parts
(each part is one unit). Each is built with 1 and 2 workers, with --unit-mb (default 0.5: gensim's
pages are long, so its 100-page streams are ~0.85 MB of bz2, and 0.5 gives each of 2 workers ~25
units, as full Wikipedia's ~1,400 default 16 MB units give each of 64 workers ~22). Targets:
2 workers >= 1.8x one worker (whole build, wall); the main process's CPU <= 10 % of the CPU of main
+ workers (2 workers; with 1, the worker runs in the main process). Reported besides: units, MB/s
of compressed input and of XML, tokens/s, the workers' stage's own speed-up, peak RSS, and whether
1 and 2 workers give byte-identical shards. The multistream dump is also built as a 2-task array
(`--task 0/2`, `--task 1/2`, then the merge): its shards must equal the one-machine build's, and it
measures the array tasks' and the merge's main-process costs.

Text. ~1 MB .txt books of the dump's cleaned articles, repeated to --mb MB: the build (2 workers,
whole wall) against the same tokenizer's raw `encode_batch` on the same text with 2 Rayon threads
(target: build / raw >= 0.9); 1 vs 2 workers (target >= 1.7x, kept from the previous version of
this benchmark).

Memory. Peak RSS of the whole process tree, text corpus at --mb and at --grow x --mb, 2 workers:
target < 2 GB at both (it must stay flat as the corpus grows).

Projection for full English Wikipedia (~22 GB bz2 / ~95 GB XML, multistream) + BookCorpus
(~0.8 B words, ~5 GB of text) on one 64-core node (64 workers), and on 8 such nodes as a Slurm array
(each task reads only its units; the merge, pack + shuffle/shard, runs on one node in one main
process), stage by stage: planning (the multistream index, timed on a synthetic index of
--index-lines lines); the workers (per-worker rates measured in the 1-worker builds' workers'
stage: XML MB/s for Wikipedia, tokens/s for text, times the workers, times the measured 1 -> 2
worker efficiency of that stage); the main process while the workers run (its measured CPU per
token; concurrent with the workers, so that phase takes the longer of the two) and after them
(split + pack: measured wall per token); for the array, the tasks' main processes (CPU per token)
and the merge (wall per token of its stages up to shard); the shard stage (measured wall per token
in the build with the most tokens). The table names the stage that bounds each total. Target:
under 30 minutes on one node. Every assumption (number and source) is printed and written to the
JSON (projection.assumptions).
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from data_prep.args import embedded_corpus
from data_prep.events import Doc
from data_prep.multistream import write_multistream
from data_prep.sources import iter_documents, parse_spec
from data_prep.units import index_offsets
from data_prep.wikitext import WikiCleaner

ROOT = Path(__file__).resolve().parent.parent
GB2 = 2 * 1024  # MB: the memory target

# The child python that runs one build: stages timed, CPU of the main process and its reaped
# workers printed at exit (one JSON line after MARK).
MARK = "BENCH_STATS "
# Build's stage methods (Build._NAME), in order, timed where they exist. The workers run in
# "tokenize" (units read, cleaned, tokenized, results saved) where the build has that stage, else
# inside "pack" (older layout: the main process packs results as they arrive).
STAGES = ("tokenizer", "tokenize", "split", "pack", "shard", "finalize")
CHILD = r"""
import json, resource, sys, time
import data_prep.array as A
import data_prep.build as B

stats = {"stages": {}, "units": None}

def timed(name, fn, count_units=False):
    def wrapper(*args, **kwargs):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            out = fn(*args, **kwargs)
            if count_units:
                stats["units"] = len(out)
            return out
        finally:
            s = stats["stages"].setdefault(name, {"wall_s": 0.0, "main_cpu_s": 0.0})
            s["wall_s"] += time.perf_counter() - w0
            s["main_cpu_s"] += time.process_time() - c0
    return wrapper

B.plan_units = timed("plan", B.plan_units, True)
A.plan_units = timed("plan", A.plan_units, True)
A.run_task = timed("task", A.run_task)
for name in STAGES:  # those the build has
    if hasattr(B.Build, "_" + name):
        setattr(B.Build, "_" + name, timed(name, getattr(B.Build, "_" + name)))

from data_prep.__main__ import main
rc = main(json.loads(sys.argv[1]))
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
stats.update(rc=rc, main_cpu_s=me.ru_utime + me.ru_stime, workers_cpu_s=kids.ru_utime + kids.ru_stime,
             main_maxrss_mb=me.ru_maxrss / 1024, worker_maxrss_mb=kids.ru_maxrss / 1024)
print(MARK + json.dumps(stats), flush=True)
sys.exit(rc)
""".replace("MARK", repr(MARK)).replace("STAGES", repr(STAGES))


# -- inputs

def cleaned_articles(spec: str) -> list[str]:
    out, cleaners = [], {}
    for ev in iter_documents(parse_spec(spec)):
        if isinstance(ev, Doc) and ev.text.strip():
            out.append(cleaners.setdefault(ev.wiki, WikiCleaner(set(ev.wiki))).clean(ev.text))
    return [a for a in out if a.strip()]


def write_books(articles: list[str], root: Path, megabytes: float) -> tuple[int, int]:
    """Book-sized files (~1 MB) cycling through the articles until the corpus reaches the size.
    Returns (bytes, words); nothing is held beyond one book."""
    root.mkdir(parents=True)
    total, words, i, b = 0, 0, 0, 0
    while total < megabytes * 1_000_000:
        parts, size = [], 0
        while size < 1_000_000:
            parts.append(articles[i % len(articles)])
            size += len(parts[-1].encode())
            i += 1
        text = "\n\n".join(parts)
        data = text.encode()
        (root / f"book{b:05d}.txt").write_bytes(data)
        total += len(data)
        words += len(text.split())
        b += 1
    return total, words


def xml_bytes(paths: list[Path]) -> int:
    """Decompressed size of bz2 files (all their streams)."""
    n = 0
    for p in paths:
        with bz2.open(p, "rb") as f:
            while block := f.read(1 << 22):
                n += len(block)
    return n


def count_lines_bz2(path: Path) -> int:
    with bz2.open(path, "rb") as f:
        return sum(1 for _ in f)


# -- running things

def run_child(argv: list[str], env: dict) -> dict:
    """One `python -m data_prep` command in a child python: wall time, peak RSS of the process tree
    (MB, summed), the stage timings and CPU the child reports, its stderr."""
    import psutil
    p = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(argv)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch():
        try:
            proc = psutil.Process(p.pid)
        except psutil.Error:
            return
        while p.poll() is None:
            try:
                rss = 0
                for x in [proc, *proc.children(recursive=True)]:
                    try:
                        rss += x.memory_info().rss
                    except psutil.Error:  # a worker that just exited
                        pass
                peak[0] = max(peak[0], rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=watch, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, err = p.communicate()
    wall = time.perf_counter() - t0
    t.join()
    stats = next((json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)), None)
    if p.returncode or stats is None:
        raise SystemExit(f"data_prep {' '.join(argv)} failed (exit {p.returncode}):\n{err[-4000:]}")
    stats.update(wall_s=wall, peak_rss_tree_mb=peak[0], stderr=err)
    return stats


def for_json(r: dict) -> dict:
    """A run's record without its full stderr (last lines kept) and checksums."""
    out = {k: x for k, x in r.items() if k not in ("stderr", "shard_sha256")}
    out["stderr_tail"] = r["stderr"].replace("\r", "\n").strip().splitlines()[-6:]
    return out


def build(out: Path, sources: list[str], workers: int, env: dict, extra: tuple[str, ...] = ()) -> dict:
    """A build and what it made: tokens, documents, shard checksums, bytes written by the shard stage."""
    r = run_child(["build", *(a for s in sources for a in ("--source", s)), "--out", str(out),
                   "--workers", str(workers), *extra], env)
    if "--task" in extra:
        return r
    m = json.loads((out / "manifest.json").read_text())
    r["tokens"] = sum(s["num_tokens"] for s in m["splits"].values())
    r["sequences"] = sum(s["num_sequences"] for s in m["splits"].values())
    r["documents_read"] = sum(s["documents_read"] for s in m["sources"])
    r["documents_kept"] = sum(s["documents_kept"] for s in m["sources"])
    r["shard_sha256"] = [(sh["sha256"], sh["boundaries"]["sha256"])
                         for s in m["splits"].values() for sh in s["shards"]]
    r["shard_bytes"] = sum(f.stat().st_size for name in m["splits"] for f in (out / name).iterdir())
    return r


def stage(r: dict, name: str, key: str = "wall_s") -> float:
    return r["stages"].get(name, {}).get(key, 0.0)


def raw_encode(tokenizer_json: Path, books: Path, threads: int) -> tuple[float, int]:
    """The same tokenizer's encode_batch on the books' text, in a fresh process with `threads`
    Rayon threads."""
    code = f"""
import json, sys, time
from pathlib import Path
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(tokenizer_json)!r})
texts = [p.read_text(encoding="utf-8") for p in sorted(Path({str(books)!r}).glob("*.txt"))]
t0 = time.perf_counter()
enc = tok.encode_batch(texts, add_special_tokens=False)
dt = time.perf_counter() - t0
print(json.dumps([dt, sum(len(e.ids) for e in enc)]))
"""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    r = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, env=env, check=True)
    dt, n = json.loads(r.stdout)
    return dt, n


def index_parse_rate(root: Path, lines: int) -> float:
    """Seconds per line for data_prep.units.index_offsets on a synthetic multistream index of
    `lines` lines shaped like Wikimedia's (OFFSET:PAGE_ID:TITLE, 100 pages a stream)."""
    root.mkdir(parents=True)
    dump = root / "synthetic-multistream.xml.bz2"
    c = bz2.BZ2Compressor(9)
    with open(root / "synthetic-multistream-index.txt.bz2", "wb") as f:
        for start in range(0, lines, 10_000):
            f.write(c.compress(b"".join(b"%d:%d:Some article title %d\n" % (600 + (i // 100) * 150_000, i + 10, i)
                                        for i in range(start, min(start + 10_000, lines)))))
        f.write(c.flush())
    size = 600 + (lines // 100 + 1) * 150_000
    t0 = time.perf_counter()
    offsets = index_offsets(dump, size)
    dt = time.perf_counter() - t0
    assert offsets is not None and len(offsets) == (lines + 99) // 100 + 1
    return dt / lines


# -- the report

class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def section(self, title: str) -> None:
        self.rows.append((f"[{title}]", "", "", ""))

    def row(self, measure: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((measure, value, target, "" if ok is None else ("pass" if ok else "MISS")))

    @staticmethod
    def is_section(r: tuple[str, str, str, str]) -> bool:
        return r[0].startswith("[") and not r[1]

    def render(self) -> str:
        head = ("measure", "value", "target", "")
        body = [r for r in self.rows if not self.is_section(r)]
        w = [max(len(r[i]) for r in [head, *body]) for i in range(3)]
        lines = [f"{head[0]:<{w[0]}}  {head[1]:<{w[1]}}  {head[2]:<{w[2]}}  result",
                 "-" * (sum(w) + 12)]
        for r in self.rows:
            if self.is_section(r):
                lines.append(r[0])
            else:
                lines.append(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip())
        return "\n".join(lines)


def fmt_s(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes; steal included)."""
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def own_cpu_s() -> float:
    """CPU seconds of this process and its children that were waited for (every build)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def worker_stage(r: dict) -> str:
    """The stage the workers run in (see STAGES)."""
    return "tokenize" if "tokenize" in r["stages"] else "pack"


def serial_stages(r: dict) -> list[str]:
    """The main process's stages between the workers' and the shard stage (none, or split and
    pack where the workers' results are saved first)."""
    return [s for s in ("split", "pack") if s in r["stages"] and s != worker_stage(r)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, help="MB of book-sized text files (default 24; --quick 2)")
    ap.add_argument("--dump-mb", type=float,
                    help="MiB of XML in each generated dump (default 150; --quick 8)")
    ap.add_argument("--grow", type=float, default=10, help="the memory check's larger text corpus: "
                                                           "GROW x --mb (default 10)")
    ap.add_argument("--unit-mb", type=float, default=0.5, help="--unit-mb of the dump builds (default 0.5)")
    ap.add_argument("--index-lines", type=int, help="lines of the synthetic index that times the planning "
                                                    "(default 1,000,000; --quick 100,000)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: --mb 2 --dump-mb 8")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "data_prep.json")
    a = ap.parse_args()
    a.mb = a.mb if a.mb is not None else (2 if a.quick else 24)
    a.dump_mb = a.dump_mb if a.dump_mb is not None else (8 if a.quick else 150)
    a.index_lines = a.index_lines or (100_000 if a.quick else 1_000_000)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for k in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        env.pop(k, None)
    wiki = embedded_corpus()
    src = Path(wiki.split(":", 1)[1])
    t_start = time.perf_counter()
    load_before, busy0, own0 = os.getloadavg()[0], busy_cpu_s(), own_cpu_s()
    res: dict = {"cores": os.cpu_count(),
                 "settings": {"mb": a.mb, "dump_mb": a.dump_mb, "grow": a.grow, "unit_mb": a.unit_mb,
                              "index_lines": a.index_lines, "quick": a.quick,
                              "tokenizer": "bert-base-uncased (the build's default)"}}

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:4.0f} s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        tmp = Path(tmp)
        # -- wiki dumps
        step(f"writing the dumps ({a.dump_mb:g} MiB of XML each) from {src.name}")
        t0 = time.perf_counter()
        ms = write_multistream(src, tmp / "ms", min_mb=a.dump_mb)
        t_ms = time.perf_counter() - t0
        t0 = time.perf_counter()
        parts = write_multistream(src, tmp / "parts", parts=4, min_mb=a.dump_mb)
        t_parts = time.perf_counter() - t0
        dumps = {"multistream": (ms[:1], f"wikipedia:{ms[0]}", t_ms),
                 "parts": (parts, f"wikipedia:{tmp / 'parts'}", t_parts)}
        unit_args = ("--unit-mb", str(a.unit_mb))
        wiki_res: dict = {}
        wiki_runs: dict = {}
        for layout, (files, spec, write_s) in dumps.items():
            bz2_mb, xml_mb = sum(p.stat().st_size for p in files) / 1e6, xml_bytes(files) / 1e6
            runs = {}
            for w in (1, 2):
                step(f"building the {layout} dump with {w} worker(s)")
                runs[w] = build(tmp / f"w_{layout}_{w}", [spec], w, env, unit_args)
            r1, r2 = runs[1], runs[2]
            ws = worker_stage(r2)
            wiki_runs[layout] = runs
            wiki_res[layout] = {
                "bz2_mb": bz2_mb, "xml_mb": xml_mb, "write_s": write_s,
                "index_lines": count_lines_bz2(ms[1]) if layout == "multistream" else None,
                "units": r2["units"], "tokens": r2["tokens"],
                "documents_read": r2["documents_read"], "documents_kept": r2["documents_kept"],
                "identical_1_vs_2_workers": r1["shard_sha256"] == r2["shard_sha256"],
                "speedup_2_vs_1": r1["wall_s"] / r2["wall_s"],
                "worker_stage": ws,
                "worker_stage_speedup_2_vs_1": stage(r1, ws) / stage(r2, ws),
                "main_cpu_share_2_workers": r2["main_cpu_s"] / (r2["main_cpu_s"] + r2["workers_cpu_s"]),
                "main_cpu_s_per_token_in_worker_stage": stage(r2, ws, "main_cpu_s") / r2["tokens"],
                "main_serial_s_per_token": sum(stage(r2, x) for x in serial_stages(r2)) / r2["tokens"],
                "xml_mb_per_s_per_worker": xml_mb / stage(r1, ws),
                "bz2_mb_per_s_per_worker": bz2_mb / stage(r1, ws),
                "runs": {f"{w}_workers": {**for_json(r), "bz2_mb_per_s": bz2_mb / r["wall_s"],
                                          "xml_mb_per_s": xml_mb / r["wall_s"],
                                          "tokens_per_s": r["tokens"] / r["wall_s"]}
                         for w, r in runs.items()},
            }
        # The multistream dump as a 2-task array, then the merge.
        step("the multistream dump as a 2-task array (--task 0/2, --task 1/2, the merge)")
        ms_spec = dumps["multistream"][1]
        tasks = [build(tmp / "w_array", [ms_spec], 2, env, (*unit_args, "--task", f"{i}/2")) for i in range(2)]
        merge = build(tmp / "w_array", [ms_spec], 2, env, unit_args)
        ms2 = wiki_runs["multistream"][2]
        task_cpu = sum(stage(t, "task", "main_cpu_s") - stage(t, "plan", "main_cpu_s") for t in tasks)
        merge_serial = [worker_stage(merge), *serial_stages(merge)]
        array_res = {
            "identical_to_one_machine": merge["shard_sha256"] == ms2["shard_sha256"],
            # the merge computed no unit itself: its workers (if any started) used next to no CPU
            "merge_used_task_results": merge["workers_cpu_s"] < 0.05 * sum(t["workers_cpu_s"] for t in tasks),
            "tasks_wall_s": [t["wall_s"] for t in tasks],
            "task_main_cpu_s_per_token": task_cpu / merge["tokens"],
            "merge_wall_s": merge["wall_s"],
            "merge_serial_stages": merge_serial,
            "merge_serial_wall_s": sum(stage(merge, x) for x in merge_serial),
            "merge_serial_s_per_token": sum(stage(merge, x) for x in merge_serial) / merge["tokens"],
            "tasks": [for_json(t) for t in tasks], "merge": for_json(merge),
        }

        # -- text
        step("cleaning the dump's articles for the text corpus")
        articles = cleaned_articles(wiki)
        text_bytes, words = write_books(articles, tmp / "books", a.mb)
        books = f"text:{tmp / 'books'}"
        step(f"text corpus ({text_bytes / 1e6:.1f} MB): 2 workers, 1 worker, raw encode_batch")
        # No validation split: ~1 MB books are too long for 0.5 % of a corpus of a few dozen
        # (a build refuses an empty split), and throughput is what is measured here.
        text_args = ("--val-fraction", "0")
        t2 = build(tmp / "t2", [books], 2, env, text_args)
        t1 = build(tmp / "t1", [books], 1, env, text_args)
        raw_dt, raw_tokens = raw_encode(tmp / "t2" / "tokenizer" / "tokenizer.json", tmp / "books", 2)
        tokens = t2["tokens"]
        ws = worker_stage(t2)
        text_res = {
            "mb": text_bytes / 1e6, "words": words, "tokens": tokens, "units": t2["units"],
            "tokens_per_word": tokens / words,
            "build_tokens_per_s_2_workers": tokens / t2["wall_s"],
            "build_tokens_per_s_1_worker": tokens / t1["wall_s"],
            "raw_encode_batch_tokens_per_s_2_threads": raw_tokens / raw_dt, "raw_tokens": raw_tokens,
            "ratio_build_to_raw": (tokens / t2["wall_s"]) / (raw_tokens / raw_dt),
            "speedup_2_vs_1": t1["wall_s"] / t2["wall_s"],
            "worker_stage": ws,
            "worker_stage_speedup_2_vs_1": stage(t1, ws) / stage(t2, ws),
            "identical_1_vs_2_workers": t1["shard_sha256"] == t2["shard_sha256"],
            "tokens_per_s_per_worker": tokens / stage(t1, ws),
            "main_cpu_share_2_workers": t2["main_cpu_s"] / (t2["main_cpu_s"] + t2["workers_cpu_s"]),
            "main_cpu_s_per_token_in_worker_stage": stage(t2, ws, "main_cpu_s") / tokens,
            "main_serial_s_per_token": sum(stage(t2, x) for x in serial_stages(t2)) / tokens,
            "runs": {"2_workers": for_json(t2), "1_worker": for_json(t1)},
        }

        # -- memory: the text corpus grown
        step(f"memory: the text corpus x{a.grow:g} ({a.grow * a.mb:g} MB), 2 workers")
        for d in (tmp / "t1", tmp / "w_array", *(tmp / f"w_{x}_{w}" for x in dumps for w in (1, 2))):
            shutil.rmtree(d, ignore_errors=True)  # room for the larger corpus
        big_bytes, _ = write_books(articles, tmp / "books_big", a.grow * a.mb)
        tb = build(tmp / "tb", [f"text:{tmp / 'books_big'}"], 2, env, text_args)
        mem_res = {"mb": [text_bytes / 1e6, big_bytes / 1e6],
                   "peak_rss_tree_mb": [t2["peak_rss_tree_mb"], tb["peak_rss_tree_mb"]],
                   "growth": tb["peak_rss_tree_mb"] / t2["peak_rss_tree_mb"], "big_run": for_json(tb)}

        step(f"planning: a synthetic multistream index of {a.index_lines:,} lines")
        index_s_per_line = index_parse_rate(tmp / "index", a.index_lines)

    # -- projection
    builds = [r for runs in wiki_runs.values() for r in runs.values()] + [t2, t1, tb]
    biggest = max(builds, key=lambda r: r["tokens"])
    shard_s_per_token = stage(biggest, "shard") / biggest["tokens"]
    shard_mb_per_s = biggest["shard_bytes"] / 1e6 / max(stage(biggest, "shard"), 1e-9)
    msr = wiki_res["multistream"]
    overlapped_note = "receive and pack results" if not serial_stages(ms2) else "receive and save results"
    A = {  # name: (value, where it comes from)
        "wiki_bz2_mb": (22_000, "English Wikipedia pages-articles-multistream, ~22 GB of bz2 (given)"),
        "wiki_xml_mb": (95_000, "its XML, ~95 GB (given)"),
        "wiki_words": (2.5e9, "English Wikipedia's article text, ~2.5 B words (the BERT paper)"),
        "book_words": (0.8e9, "BookCorpus, ~0.8 B words (given)"),
        "book_mb": (5_000, "BookCorpus, ~5 GB of text (given)"),
        "index_lines": (24e6, "one index line per page of pages-articles: ~24 M (assumed; order of "
                              "magnitude of recent dumps)"),
        "cores_per_node": (64, "given"),
        "workers_per_node": (64, "the build's default --workers = the node's cores"),
        "nodes": (8, "given: a Slurm array of 8 tasks, one per node, then the merge on one node"),
        "tokens_per_word": (text_res["tokens_per_word"], "measured: bert-base-uncased on the cleaned "
                            "articles (the text corpus); applied to both sources"),
        "xml_mb_per_s_per_worker": (msr["xml_mb_per_s_per_worker"], "measured: the 1-worker multistream "
                                    f"build, XML MB / wall of its worker stage ({msr['worker_stage']!r})"),
        "wiki_efficiency": (min(msr["worker_stage_speedup_2_vs_1"] / 2, 1.0), "measured: the multistream "
                            "workers' stage's speed-up from 1 to 2 workers / 2 (at most 1); assumed to hold "
                            "at 64 workers"),
        "text_tokens_per_s_per_worker": (text_res["tokens_per_s_per_worker"], "measured: the 1-worker "
                                         "text build's tokens / wall of its worker stage (~1 MB .txt "
                                         "books; BookCorpus read as hf: rows assumed as fast)"),
        "text_efficiency": (min(text_res["worker_stage_speedup_2_vs_1"] / 2, 1.0), "measured: the same for "
                            "the text builds"),
        "main_overlap_s_per_token_wiki": (msr["main_cpu_s_per_token_in_worker_stage"], "measured: main-"
                                          "process CPU in the 2-worker multistream build's worker stage "
                                          "/ tokens"),
        "main_overlap_s_per_token_text": (text_res["main_cpu_s_per_token_in_worker_stage"], "measured: the "
                                          "same for the 2-worker text build"),
        "main_serial_s_per_token_wiki": (msr["main_serial_s_per_token"], "measured: wall of the 2-worker "
                                         f"multistream build's {' + '.join(serial_stages(ms2)) or 'no'} "
                                         "stage(s) after the workers' / tokens"),
        "main_serial_s_per_token_text": (text_res["main_serial_s_per_token"], "measured: the same for the "
                                         "2-worker text build"),
        "task_main_s_per_token": (array_res["task_main_cpu_s_per_token"], "measured: the array tasks' "
                                  "main-process CPU (receive results, write unit files) / tokens"),
        "merge_serial_s_per_token": (array_res["merge_serial_s_per_token"], "measured: wall of the array "
                                     f"merge's {' + '.join(array_res['merge_serial_stages'])} stages (check "
                                     "and read the tasks' unit files, pack) / tokens"),
        "shard_s_per_token": (shard_s_per_token, f"measured: shard-stage wall / tokens of the largest build "
                              f"({biggest['tokens']:,} tokens, {shard_mb_per_s:,.0f} MB/s written); assumes "
                              "the packed files stay in the page cache and the disk keeps up"),
        "plan_s_per_index_line": (index_s_per_line, "measured: data_prep.units.index_offsets on a "
                                  f"synthetic {a.index_lines:,}-line index"),
        "fixed_main_s": (stage(ms2, "tokenizer") + stage(ms2, "finalize") + max(
            ms2["wall_s"] - sum(x["wall_s"] for x in ms2["stages"].values()), 0.0),
            "measured: start-up, tokenizer and finalize of the 2-worker multistream build"),
    }
    v = {k: x[0] for k, x in A.items()}
    wiki_tokens = v["wiki_words"] * v["tokens_per_word"]
    book_tokens = v["book_words"] * v["tokens_per_word"]
    total_tokens = wiki_tokens + book_tokens

    def stages_for(nodes: int) -> tuple[dict[str, float], list[str]]:
        """Each stage's seconds, and those that run at the same time (the phase takes the longest)."""
        workers = nodes * v["workers_per_node"]
        t = {"plan (read the index)": v["index_lines"] * v["plan_s_per_index_line"],
             "workers: read, clean, tokenize": (
                 v["wiki_xml_mb"] / (v["xml_mb_per_s_per_worker"] * workers * v["wiki_efficiency"])
                 + book_tokens / (v["text_tokens_per_s_per_worker"] * workers * v["text_efficiency"]))}
        if nodes == 1:
            t[f"main: {overlapped_note}"] = (wiki_tokens * v["main_overlap_s_per_token_wiki"]
                                             + book_tokens * v["main_overlap_s_per_token_text"])
            together = list(t)[1:]
            serial = (wiki_tokens * v["main_serial_s_per_token_wiki"]
                      + book_tokens * v["main_serial_s_per_token_text"])
            if serial:
                t["main: " + " + ".join(serial_stages(ms2)) + " (after them)"] = serial
        else:
            t["tasks' mains: receive and save results"] = total_tokens / nodes * v["task_main_s_per_token"]
            together = list(t)[1:]
            t["merge: plan (read the index)"] = t["plan (read the index)"]
            t["merge: " + " + ".join(array_res["merge_serial_stages"])] = total_tokens * v["merge_serial_s_per_token"]
        t["shard (shuffle, write)"] = total_tokens * v["shard_s_per_token"]
        t["fixed (start-up, tokenizer, finalize)"] = v["fixed_main_s"]
        return t, together

    projection = {}
    for nodes in (1, v["nodes"]):
        t, together = stages_for(nodes)
        total = max(t[k] for k in together) + sum(x for k, x in t.items() if k not in together)
        projection[f"{nodes}_node{'s' if nodes > 1 else ''}"] = {
            "stages_s": t, "concurrent": together, "total_s": total, "bound_by": max(t, key=t.get)}
    proj_res = {"assumptions": {k: {"value": x[0], "source": x[1]} for k, x in A.items()},
                "wiki_tokens": wiki_tokens, "book_tokens": book_tokens, "total_tokens": total_tokens,
                "wiki_tokens_at_the_bench_dumps_ratio": v["wiki_xml_mb"] * msr["tokens"] / msr["xml_mb"],
                "packed_gb": total_tokens * (256 + 16) / 128 / 1e9,
                "packed_note": "~2.1 bytes a token (uint16 ids + boundary bits) in the pack stage's files; "
                               "the shard stage reads them back and writes as much again",
                **projection}
    wall = time.perf_counter() - t_start
    others = max(busy_cpu_s() - busy0 - (own_cpu_s() - own0), 0.0)
    machine = {"load_average_1min_before": load_before, "other_processes_cpu_s": others,
               "other_processes_share": others / (wall * (os.cpu_count() or 1))}
    res.update(machine=machine, wiki=wiki_res, array=array_res, text=text_res, memory=mem_res,
               projection=proj_res, bench_wall_s=wall)

    # -- the table
    T = Table()
    T.section(f"machine: {os.cpu_count()} cores")
    T.row("  other processes' CPU during the benchmark", f"{100 * machine['other_processes_share']:.1f} % of "
          f"the cores ({others:.0f} CPU s; 1-min load {load_before:.2f} before)",
          "< 5 %", machine["other_processes_share"] < 0.05)
    for layout, d in wiki_res.items():
        r2 = d["runs"]["2_workers"]
        desc = "multistream + index" if layout == "multistream" else "4 single-stream parts"
        T.section(f"wiki dump, {desc}: {d['xml_mb']:.0f} MB XML, {d['bz2_mb']:.1f} MB bz2, "
                  f"{d['units']} units (--unit-mb {a.unit_mb:g}), {d['tokens']:,} tokens")
        for w, r in d["runs"].items():
            T.row(f"  build, {w.replace('_', ' ').replace('1 workers', '1 worker')}",
                  f"{r['wall_s']:.1f} s: {r['bz2_mb_per_s']:.2f} MB/s bz2, {r['xml_mb_per_s']:.1f} MB/s XML, "
                  f"{r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_tree_mb']:.0f} MB")
        T.row("  2 workers / 1 worker (whole build)", f"{d['speedup_2_vs_1']:.2f}x", ">= 1.8x",
              d["speedup_2_vs_1"] >= 1.8)
        T.row(f"  2 workers / 1 worker ({d['worker_stage']} stage)", f"{d['worker_stage_speedup_2_vs_1']:.2f}x")
        T.row("  main process's CPU share, 2 workers", f"{100 * d['main_cpu_share_2_workers']:.1f} % "
              f"({r2['main_cpu_s']:.1f} of {r2['main_cpu_s'] + r2['workers_cpu_s']:.1f} CPU s)", "<= 10 %",
              d["main_cpu_share_2_workers"] <= 0.10)
        T.row("  output identical, 1 vs 2 workers", "yes" if d["identical_1_vs_2_workers"] else "NO",
              "identical", d["identical_1_vs_2_workers"])
    T.section("the multistream dump as a 2-task array")
    T.row("  tasks 0/2, 1/2 (2 workers each); merge",
          " + ".join(f"{x:.1f}" for x in array_res["tasks_wall_s"]) + f" s; merge {array_res['merge_wall_s']:.1f} s "
          f"({' + '.join(array_res['merge_serial_stages'])}: {array_res['merge_serial_wall_s']:.2f} s)")
    T.row("  merge packed the tasks' results", "yes" if array_res["merge_used_task_results"] else "NO",
          "yes", array_res["merge_used_task_results"])
    T.row("  output identical to the one-machine build", "yes" if array_res["identical_to_one_machine"] else "NO",
          "identical", array_res["identical_to_one_machine"])
    T.section(f"text: {text_res['mb']:.1f} MB in ~1 MB books, {words:,} words, {tokens:,} tokens, "
              f"{text_res['units']} units")
    T.row("  build, 2 workers", f"{text_res['build_tokens_per_s_2_workers']:,.0f} tokens/s "
          f"({t2['wall_s']:.1f} s, peak RSS {t2['peak_rss_tree_mb']:.0f} MB)")
    T.row("  build, 1 worker", f"{text_res['build_tokens_per_s_1_worker']:,.0f} tokens/s ({t1['wall_s']:.1f} s)")
    T.row("  raw encode_batch, 2 threads", f"{text_res['raw_encode_batch_tokens_per_s_2_threads']:,.0f} tokens/s")
    T.row("  build (2 workers) / raw (2 threads)", f"{text_res['ratio_build_to_raw']:.2f}", ">= 0.9",
          text_res["ratio_build_to_raw"] >= 0.9)
    T.row("  2 workers / 1 worker (whole build)", f"{text_res['speedup_2_vs_1']:.2f}x "
          f"({text_res['worker_stage']} stage {text_res['worker_stage_speedup_2_vs_1']:.2f}x)", ">= 1.7x",
          text_res["speedup_2_vs_1"] >= 1.7)
    T.row("  main process's CPU share, 2 workers", f"{100 * text_res['main_cpu_share_2_workers']:.1f} %")
    T.row("  output identical, 1 vs 2 workers", "yes" if text_res["identical_1_vs_2_workers"] else "NO",
          "identical", text_res["identical_1_vs_2_workers"])
    T.section("memory: peak RSS of the whole process tree, text, 2 workers")
    for mb, rss in zip(mem_res["mb"], mem_res["peak_rss_tree_mb"]):
        T.row(f"  {mb:.0f} MB of text", f"{rss:.0f} MB", "< 2 GB", rss < GB2)
    T.row(f"  growth for x{a.grow:g} the text", f"{mem_res['growth']:.2f}x")
    T.section(f"projection: Wikipedia + BookCorpus, {total_tokens / 1e9:.2f} B tokens (assumptions below)")
    for key, label in (("1_node", "1 node"), ("8_nodes", "8 nodes")):
        p = projection[key]
        for name, sec in p["stages_s"].items():
            T.row(f"  {label}: {name}" + (" [concurrent]" if name in p["concurrent"] else ""), fmt_s(sec))
        T.row(f"  {label}: total; bound by {p['bound_by']}", fmt_s(p["total_s"]),
              "< 30 min" if key == "1_node" else "", p["total_s"] < 1800 if key == "1_node" else None)
    table = T.render()
    notes = []
    if machine["other_processes_share"] >= 0.05:
        notes.append("WARNING: other processes used the CPU during the benchmark: its rates, ratios and "
                     "projection are unreliable; run it again on an idle machine\n")
    notes.append("projection assumptions (name = value: where it comes from):")
    notes += [f"  {k} = {val:.4g}: {why}" for k, (val, why) in A.items()]
    notes.append("  [concurrent] stages overlap: their phase takes the longest of them; the others add up")
    notes.append(f"  Wikipedia's tokens come from its words; at the bench dump's {msr['tokens'] / msr['xml_mb']:,.0f} "
                 f"tokens per XML MB it would be {proj_res['wiki_tokens_at_the_bench_dumps_ratio'] / 1e9:.1f} B: "
                 "gensim's dump is long articles, the real one has many redirects and non-article pages, "
                 "which the workers skip after parsing, so charging the workers per XML MB at this dump's "
                 "rate is on the safe side")
    notes.append(f"  the pack stage's files hold ~{proj_res['packed_gb']:.1f} GB, which the shard stage reads "
                 "back and writes again")
    print(table + "\n\n" + "\n".join(notes))
    res["table"] = table.splitlines() + [""] + notes
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(f"\nwrote {a.json} (the benchmark took {fmt_s(res['bench_wall_s'])})")


if __name__ == "__main__":
    main()
