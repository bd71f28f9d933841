"""Units of work (data_prep/units.py) for every kind of input: the bytes are the same whatever the
unit size, the worker count, or an array of 3 tasks (each of which reads only its units), with a
given and with a trained vocabulary; kills at random points, then a resume, change nothing."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, tree_bytes
from data_prep.build import BuildArgs, build
from data_prep.multistream import write_multistream
from data_prep.sources import parse_spec, plan_units
from data_prep.wikitext import WikiCleaner
from data_prep.sources import iter_documents
from data_prep.events import Doc

WHOLE = 1000.0  # --unit-mb: every file one unit


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, wiki_dump):
    """Each kind of splittable input, built from the real dump (about 1.7 MB of bz2)."""
    root = tmp_path_factory.mktemp("units")
    indexed, scanned, parts = root / "indexed", root / "scanned", root / "parts"
    write_multistream(wiki_dump, indexed, pages_per_stream=2)
    scanned.mkdir()
    for p in indexed.glob("*multistream.xml.bz2"):  # the same file, without its index
        shutil.copy(p, scanned / p.name)
    write_multistream(wiki_dump, parts, parts=3)
    cleaners = {}
    texts = []
    for ev in iter_documents(parse_spec(f"wikipedia:{wiki_dump}")):
        if isinstance(ev, Doc):
            texts.append(cleaners.setdefault(ev.wiki, WikiCleaner(set(ev.wiki))).clean(ev.text))
    books = root / "books"
    books.mkdir()
    # One long book (a document read in ranges, with a bad byte in a later range) and a short one.
    body = "\n".join(texts).encode()
    (books / "long.txt").write_bytes(body[:len(body) // 2] + b"\xff" + body[len(body) // 2:])
    (books / "short.txt").write_text(texts[0])
    jsonl = root / "web.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "not json\n"
                     + "".join(json.dumps({"id": f"x{i}", "text": t}) + "\n" for i, t in enumerate(texts[:20])))
    import pyarrow as pa
    import pyarrow.parquet as pq
    hf = root / "hf" / "data"
    hf.mkdir(parents=True)
    for k in range(3):
        pq.write_table(pa.table({"text": texts[k::3]}), hf / f"train-{k:05d}-of-00003.parquet")
    return {"multistream": (f"wikipedia:{indexed}", 0.2), "scan": (f"wikipedia:{scanned}", 0.2),
            "parts": (f"wikipedia:{parts}", 0.1), "text": (f"text:{books}", 0.2),
            "jsonl": (f"jsonl:{jsonl}", 0.2), "hf": (f"hf:{hf.parent}", 0.2)}


def shards(out: Path) -> dict:
    """What must not depend on units, workers or tasks: tokens, the tokenizer, the counts."""
    m = json.loads((out / "manifest.json").read_text())
    files = {k: v for k, v in tree_bytes(out).items() if not k.endswith("manifest.json")}
    return {"files": files, "splits": m["splits"], "sources": m["sources"]}


def array_build(out: Path, passes: int, **args) -> list[dict]:
    """An array of 3 tasks (run `passes` times, as slurm/prep_data.sh does), then the merge;
    returns each task's task-I.json."""
    for _ in range(passes):
        for i in range(3):
            build(BuildArgs(out=out, task=f"{i}/3", **args))
    reports = [json.loads((out / ".array" / f"task-{i}.json").read_text()) for i in range(3)]
    build(BuildArgs(out=out, **args))
    return reports


def own_bytes(spec: str, unit_mb: float, task: int) -> tuple[int, int]:
    """The bytes of the units task `task` of 3 owns, and their number."""
    units = [u for u in plan_units([parse_spec(spec)], int(unit_mb * 1e6)) if u.index % 3 == task]
    return sum(u.end - u.start for u in units), len(units)


@pytest.mark.parametrize("kind", ["multistream", "scan", "parts", "text", "jsonl", "hf"])
def test_same_bytes_for_any_units_workers_and_tasks(tmp_path, inputs, bert_vocab, kind):
    spec, unit_mb = inputs[kind]
    units = plan_units([parse_spec(spec)], int(unit_mb * 1e6))
    assert len(units) >= 3, units  # the input is really cut (parts: a unit per single-stream part)
    common = dict(sources=[spec], tokenizer=str(bert_vocab), seq_len=64, val_fraction=0.1)
    whole, parallel, array = tmp_path / "whole", tmp_path / "parallel", tmp_path / "array"
    build(BuildArgs(out=whole, unit_mb=WHOLE, workers=1, **common))
    build(BuildArgs(out=parallel, unit_mb=unit_mb, workers=2, **common))
    reports = array_build(array, 1, unit_mb=unit_mb, workers=1, **common)
    assert shards(whole) == shards(parallel) == shards(array)
    assert not (array / ".array").exists()
    if kind == "hf":
        return  # datasets reads the files itself: not metered
    total = sum(u.end - u.start for u in units)
    for i, rep in enumerate(reports):  # each task read its own units, and little more
        own, n = own_bytes(spec, unit_mb, i)
        assert own * 0.5 <= rep["bytes_read"] <= 2 * own + 3 * 65536 * n, (i, rep, own)
        assert rep["bytes_read"] < 0.5 * total
    if kind == "text":  # one document read in 8+ ranges: its repair counted once
        m = json.loads((whole / "manifest.json").read_text())["sources"][0]
        assert m["documents_kept"] == 2 and m["repaired"] == {"invalid_utf8": 1}


@pytest.mark.parametrize("kind", ["multistream", "text"])
def test_trained_vocabulary_is_the_same_everywhere(tmp_path, inputs, kind):
    """--vocab-size: word counts from units counted in parallel (or by array tasks in a first
    pass) give one vocabulary, so the bytes match too."""
    spec, unit_mb = inputs[kind]
    common = dict(sources=[spec], vocab_size=2000, seq_len=64, val_fraction=0.1)
    whole, parallel, array = tmp_path / "whole", tmp_path / "parallel", tmp_path / "array"
    build(BuildArgs(out=whole, unit_mb=WHOLE, workers=1, **common))
    build(BuildArgs(out=parallel, unit_mb=unit_mb, workers=2, **common))
    # The first pass counts; a task that finds a unit not yet counted stops there (here the
    # tasks run one after the other, so the last one finds every count and goes on).
    for i in range(3):
        build(BuildArgs(out=array, task=f"{i}/3", unit_mb=unit_mb, workers=1, **common))
    assert [p.name for p in (array / ".array").glob("task-*.json")] == ["task-2.json"]
    array_build(array, 1, unit_mb=unit_mb, workers=1, **common)
    assert shards(whole) == shards(parallel) == shards(array)
    assert len(json.loads((whole / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]) == 2000


def test_killed_array_tasks_and_merge_resume_identically(tmp_path, inputs, bert_vocab):
    """kill -9 at random moments of the tasks (once some of their units are saved) and of the
    merge; running each again finishes with the one-machine build's bytes."""
    spec, unit_mb = inputs["scan"]
    flags = ["--source", spec, "--tokenizer", str(bert_vocab), "--seq-len", "64", "--val-fraction", "0.1",
             "--unit-mb", str(unit_mb / 4), "--workers", "2"]
    single = tmp_path / "single"
    assert run_cli("-m", "data_prep", "build", *flags, "--out", single).returncode == 0
    out = tmp_path / "array"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DATA_PREP_CHECKPOINT_SECONDS="0.05")
    rng = random.Random(3)
    kills = 0
    for extra, sign in ((["--task", "0/3"], "units/*.npz"), (["--task", "1/3"], "units/*.npz"),
                        (["--task", "2/3"], "units/*.npz"), ([], "../.work/state.json")):
        cmd = [sys.executable, "-m", "data_prep", "build", *flags, "--out", str(out), *extra]
        before = set((out / ".array").glob(sign))
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        deadline = time.time() + 120
        while p.poll() is None and set((out / ".array").glob(sign)) <= before and time.time() < deadline:
            time.sleep(0.02)  # until it has saved something: then a kill lands mid-way
        time.sleep(rng.uniform(0, 0.3))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert kills >= 3
    assert shards(out) == shards(single)


def test_bad_index_and_corrupt_stream(tmp_path, inputs, bert_vocab):
    """An index whose offsets are not stream starts, and a stream corrupted in the middle of the
    dump: a message naming the file, exit 2, no output."""
    spec, _ = inputs["multistream"]
    src = Path(spec.split(":", 1)[1])
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    dump = next(bad.glob("*multistream.xml.bz2"))
    index = next(bad.glob("*index.txt.bz2"))
    import bz2
    lines = [line.split(b":", 1) for line in bz2.decompress(index.read_bytes()).splitlines()]
    # Every offset 7 bytes off: an index that belongs to another copy of the dump.
    index.write_bytes(bz2.compress(b"".join(b"%d:%s\n" % (int(o) + 7, rest) for o, rest in lines)))
    r = run_cli("-m", "data_prep", "build", "--source", f"wikipedia:{bad}", "--out", tmp_path / "o1",
                "--tokenizer", str(bert_vocab), "--unit-mb", "0.1", "--workers", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and dump.name in r.stderr \
        and "no bz2 stream begins at byte" in r.stderr, r.stderr
    assert not (tmp_path / "o1" / "manifest.json").exists()
    index.unlink()
    data = bytearray(dump.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    dump.write_bytes(bytes(data))
    r = run_cli("-m", "data_prep", "build", "--source", f"wikipedia:{bad}", "--out", tmp_path / "o2",
                "--tokenizer", str(bert_vocab), "--unit-mb", "0.1", "--workers", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr and dump.name in r.stderr, r.stderr
    assert not (tmp_path / "o2" / "manifest.json").exists()
