"""Benchmark of `python -m data_prep build` (a benchmark, not a test).

On >= 20 MB of real text (the cleaned articles of gensim's English Wikipedia dump, laid out as
book-sized .txt files, repeated to reach the size): end-to-end build throughput against the same
tokenizer's raw encode_batch on the same text with the same number of cores; 1 vs 2 workers;
peak RSS of the whole process tree; the Wikipedia-dump path (markup cleaning included); and a
projection for English Wikipedia + BookCorpus on one 64-core node.

    python -m bench.data_prep [--mb 24] [--json bench/out/data_prep.json]

From the repository root, as a module: run as a script, this file's own directory would come
first on the import path and `import data_prep` would find this file instead of the package.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from data_prep.args import embedded_corpus
from data_prep.chunks import iter_chunks
from data_prep.events import Doc
from data_prep.sources import iter_documents, parse_spec
from data_prep.wikitext import WikiCleaner

ROOT = Path(__file__).resolve().parent.parent

WORDS_FULL_CORPUS = 3.3e9  # English Wikipedia (~2.5 B words) + BookCorpus (~0.8 B words)
WIKI_SHARE = 2.5 / 3.3


def cleaned_articles(spec: str) -> list[str]:
    out, cleaners = [], {}
    for ev in iter_documents(parse_spec(spec)):
        if isinstance(ev, Doc):
            out.append(cleaners.setdefault(ev.wiki, WikiCleaner(set(ev.wiki))).clean(ev.text))
    return out


def write_books(articles: list[str], root: Path, megabytes: int) -> list[str]:
    """Book-sized files (~1 MB) cycling through the articles until the corpus reaches the size."""
    root.mkdir(parents=True)
    books, total, i, b = [], 0, 0, 0
    while total < megabytes * 1_000_000:
        parts, size = [], 0
        while size < 1_000_000:
            parts.append(articles[i % len(articles)])
            size += len(parts[-1].encode())
            i += 1
        text = "\n\n".join(parts)
        (root / f"book{b:04d}.txt").write_text(text, encoding="utf-8")
        books.append(text)
        total += len(text.encode())
        b += 1
    return books


def run_build(args: list[str], env: dict) -> tuple[float, float]:
    """Wall time and peak RSS (MB, the process tree summed) of one build."""
    import psutil
    p = subprocess.Popen([sys.executable, "-m", "data_prep", "build", *args], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def watch():
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                rss = sum(x.memory_info().rss for x in [proc, *proc.children(recursive=True)])
                peak[0] = max(peak[0], rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=watch)
    t0 = time.perf_counter()
    t.start()
    _, err = p.communicate()
    dt = time.perf_counter() - t0
    t.join()
    if p.returncode:
        raise SystemExit(f"build failed:\n{err}")
    return dt, peak[0]


def raw_encode(tokenizer_json: Path, texts: list[str], threads: int) -> tuple[float, int]:
    """The same tokenizer's encode_batch in a fresh process with `threads` Rayon threads."""
    code = f"""
import json, sys, time
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(tokenizer_json)!r})
texts = json.load(sys.stdin)
t0 = time.perf_counter()
enc = tok.encode_batch(texts, add_special_tokens=False)
dt = time.perf_counter() - t0
print(json.dumps([dt, sum(len(e.ids) for e in enc)]))
"""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), text=True,
                       capture_output=True, env=env, check=True)
    dt, n = json.loads(r.stdout)
    return dt, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=24)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "data_prep.json")
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    wiki = embedded_corpus()
    results: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        articles = cleaned_articles(wiki)
        books = write_books(articles, tmp / "books", a.mb)
        mb = sum(len(b.encode()) for b in books) / 1e6
        words = sum(len(b.split()) for b in books)
        common = ["--source", f"text:{tmp / 'books'}", "--val-fraction", "0.005"]
        t2, rss2 = run_build([*common, "--out", str(tmp / "o2"), "--workers", "2"], env)
        t1, rss1 = run_build([*common, "--out", str(tmp / "o1"), "--workers", "1"], env)
        m = json.loads((tmp / "o2" / "manifest.json").read_text())
        tokens = sum(s["num_tokens"] for s in m["splits"].values())
        raw_dt, raw_tokens = raw_encode(tmp / "o2" / "tokenizer" / "tokenizer.json", books, 2)
        # Reader alone (main process: read, decode, cut into chunks), to find its ceiling.
        t0 = time.perf_counter()
        for _ in iter_chunks([parse_spec(f"text:{tmp / 'books'}")]):
            pass
        reader_text = mb / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        markup = sum(len(page.xml) for ch in iter_chunks([parse_spec(wiki)]) for page in ch.items)
        reader_wiki = markup / 1e6 / (time.perf_counter() - t0)
        tw, rssw = run_build(["--source", wiki, "--out", str(tmp / "ow"), "--workers", "2"], env)
        mw = json.loads((tmp / "ow" / "manifest.json").read_text())
        wiki_tokens = sum(s["num_tokens"] for s in mw["splits"].values())
        tw1, _ = run_build(["--source", wiki, "--out", str(tmp / "ow1"), "--workers", "1"], env)

    tokens_per_word = tokens / words
    per_worker_text = tokens / t1
    per_worker_wiki = wiki_tokens / tw1
    full_tokens = WORDS_FULL_CORPUS * tokens_per_word
    scaling = t1 / t2 / 2  # parallel efficiency measured from 1 to 2 workers
    cores = 64
    workers_time = (full_tokens * WIKI_SHARE / (per_worker_wiki * cores * scaling)
                    + full_tokens * (1 - WIKI_SHARE) / (per_worker_text * cores * scaling))
    # The reader is one process: its ceiling in tokens/s from the markup and text rates measured.
    wiki_markup_per_token = markup / wiki_tokens
    reader_time = (full_tokens * WIKI_SHARE * wiki_markup_per_token / (reader_wiki * 1e6)
                   + full_tokens * (1 - WIKI_SHARE) * (mb * 1e6 / tokens) / (reader_text * 1e6))
    results.update({
        "corpus_mb": round(mb, 1), "words": words, "tokens": tokens,
        "build_tokens_per_s_2_workers": tokens / t2, "build_tokens_per_s_1_worker": tokens / t1,
        "raw_encode_batch_tokens_per_s_2_threads": raw_tokens / raw_dt,
        "ratio_build_to_raw": (tokens / t2) / (raw_tokens / raw_dt),
        "speedup_2_vs_1_workers": t1 / t2, "peak_rss_mb_2_workers": rss2, "peak_rss_mb_1_worker": rss1,
        "wall_s_2_workers": t2, "wall_s_1_worker": t1,
        "wiki_build_tokens_per_s_2_workers": wiki_tokens / tw, "wiki_build_tokens_per_s_1_worker":
            per_worker_wiki, "wiki_peak_rss_mb": rssw, "wiki_markup_mb": markup / 1e6,
        "reader_mb_per_s_text": reader_text, "reader_mb_per_s_wiki_markup": reader_wiki,
        "projection_full_corpus_tokens": full_tokens,
        "projection_hours_64_cores": max(workers_time, reader_time) / 3600,
        "projection_hours_64_cores_worker_bound": workers_time / 3600,
        "projection_hours_64_cores_reader_bound": reader_time / 3600,
    })
    rows = [
        ("corpus", f"{mb:.1f} MB real text, {words:,} words, {tokens:,} tokens"),
        ("build, 2 workers", f"{tokens / t2:,.0f} tokens/s ({t2:.1f} s wall, peak RSS {rss2:.0f} MB)"),
        ("build, 1 worker", f"{tokens / t1:,.0f} tokens/s ({t1:.1f} s wall, peak RSS {rss1:.0f} MB)"),
        ("raw encode_batch, 2 threads", f"{raw_tokens / raw_dt:,.0f} tokens/s"),
        ("ratio build / raw (target >= 0.7)", f"{results['ratio_build_to_raw']:.2f}"),
        ("2 workers / 1 worker (target >= 1.7)", f"{t1 / t2:.2f}x"),
        ("wikipedia dump, 2 workers", f"{wiki_tokens / tw:,.0f} tokens/s ({markup / 1e6:.1f} MB markup, "
                                      f"peak RSS {rssw:.0f} MB)"),
        ("wikipedia dump, 1 worker", f"{per_worker_wiki:,.0f} tokens/s"),
        ("reader ceiling (1 process)", f"text {reader_text:,.0f} MB/s, wiki markup {reader_wiki:,.0f} MB/s"),
        ("projection: 3.3 B words on 64 cores", f"{results['projection_hours_64_cores']:.2f} h "
         f"(workers {workers_time / 3600:.2f} h, reader {reader_time / 3600:.2f} h; "
         f"{full_tokens / 1e9:.2f} B tokens)"),
    ]
    w = max(len(r[0]) for r in rows)
    print("\n".join(f"{k:<{w}}  {v}" for k, v in rows))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
