"""Hostile files (issue 14): every JSON and npz reader, called in-process on any content, either
reads it or raises UserError naming the file (the commands' exit 2), never another exception, and
writes nothing.

"Any content": arbitrary bytes (empty, invalid UTF-8, UTF-16, NUL, JSON nested 100000 deep, an
integer of 5000 digits, NaN, trailing garbage), JSON of any type at the top level, and a valid file
as the code writes it with one field (at any depth) dropped, replaced by any JSON value (null,
bools, huge and negative integers, NaN/inf, strings, lists, objects) or joined by an unknown one.
Gate snapshots (.npz): random bytes, zips with foreign members, arrays of the wrong shape, dtype
or ndim, NaN, and pickled object arrays (refused without unpickling: a tripwire object's
__reduce__ would record the call).

Readers: data_prep.manifest.load_manifest and pipeline.engine.check_data (manifest.json, then the
shards verify reads); RunDir: run.json (read_identity, fingerprint, searches, left_search,
stage), search.json (read_search, SearchSettings.from_record), wandb.json, finished.json,
pruned/trainer_state.json (read_pruned_state, TrainState.from_dict), checkpoints/latest.json,
metrics.jsonl (read_metrics), gates/step-*.npz (snapshot_paths, read_snapshot), ticket.json
(ticket_step, read_ticket, put_ticket's and publish_ticket's reads); pipeline.stage.locate and the
monitor's reading and drawing on a RUN holding the hostile file; BertConfig.from_json (our
format and Hugging Face's) and pipeline.hf.load_pretrained (config.json and the weights file);
pipeline.engine.load_ds_config (the DeepSpeed config's JSON and the types of the keys the trainer
reads, then the trainer's own reads of them and its optimizer).
"""
import argparse
import copy
import functools
import json
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from conftest import ROOT
from data_prep.files import atomic_write_json, sha256_file
from data_prep.manifest import load_manifest
from pipeline.engine import check_data, load_ds_config, run_identity, training_dtype
from pipeline.errors import UserError
from pipeline.hf import export, hf_config_dict, load_pretrained
from pipeline.model import BertConfig, BertForMLM
from pipeline.monitor import OVERRIDES, Monitor, with_flags
from pipeline.optim import make_optimizer
from pipeline.run_dir import RunDir, SearchRecord, TrainState, ticket_record
from pipeline.settings import SearchSettings, TrainSettings
from pipeline.stage import locate

# No shrinking: a failure is reported with the example as generated, at once (shrinking through
# every reader of a run directory took minutes); no example database is written into the checkout.
EXAMPLES = settings(max_examples=80, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------ any content

DEEP = 100_000
SPECIAL_BYTES = [b"", b"\n", b" ", b"\x00" * 8, b"\xff\xfe\xfd", b"\xc3\x28", b"\xed\xa0\x80",
                 b"[" * DEEP, b"[" * DEEP + b"]" * DEEP, b'{"a":' * DEEP, b"1" * 5000, b"-" + b"9" * 5000,
                 b"NaN", b"-Infinity", b"1e400", b"null", b"true", b'"\\ud800"', b"[]", b"{}",
                 '{"step": 1}'.encode("utf-16"), b"\xef\xbb\xbf{}", b'{"a": 1} trailing', b'{"a": 1',
                 b'{"a": 1, "a": [1, 2]}']
BIG_INTS = [10 ** 400, -10 ** 400, 2 ** 63, 2 ** 63 - 1, -2 ** 63 - 1, 2 ** 31, -1, 0, 1]
scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(BIG_INTS)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def dumps(value) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity as Python writes them


any_bytes = st.binary(max_size=300) | st.sampled_from(SPECIAL_BYTES)
contents = any_bytes | json_values.map(dumps)


def _paths(value, prefix=()):
    """Every place in a JSON document (a few items of each list)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i in sorted({0, 1, len(value) - 1} & set(range(len(value)))):
            yield from _paths(value[i], prefix + (i,))


@st.composite
def mutated(draw, valid):
    """`valid` with one place, at any depth, dropped, replaced by any JSON value, or given an
    unknown key."""
    doc = copy.deepcopy(valid)
    where = draw(st.sampled_from([p for p in _paths(doc) if p]))
    parent = doc
    for k in where[:-1]:
        parent = parent[k]
    action = draw(st.sampled_from(["drop", "replace", "replace", "add"]))
    if action == "drop":
        del parent[where[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(json_values)
    else:
        parent[where[-1]] = draw(json_values)
    return doc


def file_contents(valid) -> st.SearchStrategy:
    """Any bytes, or (half the time) `valid`, a document the code writes, mutated, as bytes."""
    return st.booleans().flatmap(lambda mutate: mutated(valid).map(dumps) if mutate else contents)


# ------------------------------------------------------------------ the checks

def tree(root: Path) -> dict:
    """Every name under root, with the bytes of each file."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def refused_or_read(call, named, root: Path):
    """call() returns, or raises UserError whose message names `named`; nothing under root changes."""
    before = tree(root)
    out = _call(call, named)
    assert tree(root) == before, "a reader wrote"
    return out


def _call(call, named):
    try:
        return call()
    except UserError as e:
        assert str(named) in str(e), (str(named), str(e))
        return None


# ------------------------------------------------------------------ a run directory as the trainer writes it

HEADS, FFN = [4, 4], [16, 12]  # per-layer widths: exported as model_type earlybert
CONFIG = BertConfig(vocab_size=100, hidden_size=16, heads=HEADS, ffn=FFN, head_size=4, max_position_embeddings=32,
                    gates=True)
SEARCH = SearchSettings(search_min_steps=10, prune_heads=1, ffn_multiple=4)
SNAPSHOT_STEPS = (10, 20, 30)


def make_run(root: Path, pruned: bool = False) -> RunDir:
    run = RunDir(root / "run")
    run.path.mkdir(parents=True)
    train = TrainSettings(data=root / "data", run_dir=run.path, model="bert-tiny", max_steps=100,
                          deepspeed_config=root / "ds.json")
    manifest = {"splits": {"train": {"shards": [{"sha256": "ab" * 32}]}}, "seq_len": 32}
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    run.write_identity(run_identity(train, argparse.Namespace(config=CONFIG), manifest, ds, SEARCH))
    run.write_search(SearchRecord(SEARCH, HEADS, FFN))
    run.write_wandb({"id": "abc123", "project": "p", "entity": None, "group": "earlybert-abc123", "mode": "offline"})
    run.checkpoints.mkdir()
    (run.checkpoints / "tmp-step-0000020").mkdir()
    run.publish_checkpoint("tmp-step-0000020", "step-0000020", 20, keep=3, phase="search")
    rng = np.random.default_rng(0)
    for step in SNAPSHOT_STEPS:
        run.write_snapshot(step, [rng.random(n) for n in HEADS], [rng.random(n) for n in FFN])
    for step in (1, 2):
        run.append_metrics({"step": step, "phase": "search", "loss": 5.0 - step, "lr": 1e-4})
    run.publish_ticket(ticket_record(20, "early-bird", "monitor", run.fingerprint(), *_masks(), []))
    if pruned:
        run.pruned.mkdir()
        atomic_write_json(run.pruned_state, PRUNED_STATE)
    return run


def _masks():
    return [np.array([1, 1, 1, 0], dtype=bool)] * 2, [np.arange(n) % 3 != 0 for n in FFN]


PRUNED_STATE = {"state": TrainState(step=20, consumed=160, tokens=4000, elapsed=1.5).to_dict(), "ticket_step": 20,
                "reason": "early-bird", "source": "monitor", "ticket": "rule", "weights": "carry",
                "dense": {"heads": HEADS, "ffn": FFN}, "heads": [[1, 1, 1, 0]] * 2, "ffn": [[1] * n for n in FFN]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two runs as the trainer writes them (searching; and with RUN/pruned/), to copy from."""
    return {pruned: make_run(tmp_path_factory.mktemp(f"run-{pruned}"), pruned) for pruned in (False, True)}


def copy_run(runs: dict, root: Path, pruned: bool = False) -> RunDir:
    shutil.copytree(runs[pruned].path, root / "run")
    return RunDir(root / "run")


def everything_reading_run(run: RunDir, root: Path) -> None:
    """What the trainer's start and the monitor read from RUN, each reader on its own: each returns
    or raises UserError naming a file in RUN."""
    settings_ = TrainSettings(data=root / "data", run_dir=run.path, model="bert-tiny", max_steps=100,
                              deepspeed_config=root / "ds.json")
    before = tree(root)
    readers = [run.read_identity, run.fingerprint, run.searches, run.stage, run.left_search, run.read_search,
               run.read_wandb, run.finished_step, run.latest_checkpoint, run.read_metrics, run.snapshot_paths,
               run.ticket_step, lambda: run.read_ticket(HEADS, FFN), lambda: locate(run, settings_, SEARCH),
               lambda: run.read_pruned_state() if run.pruned_ready() else None, lambda: watch(run)]
    for read in readers:
        _call(read, run.path)
    assert run.ticket_step() is None or isinstance(run.ticket_step(), int)
    assert tree(root) == before, "a reader wrote"


def watch(run: RunDir) -> None:
    """The monitor's reading and drawing (its main loop without the plots): RUN/search.json, its
    flags over it, every snapshot up to the ticket (in place, so nothing is published)."""
    search = run.read_search()
    if search is None or run.read_identity() is None:
        return
    flags = argparse.Namespace(**{flag: None for flag in OVERRIDES})
    m = Monitor(run, with_flags(search, flags, str(run.search_json)))
    for step, path in run.snapshot_paths():
        m.process(step, path)


RUN_FILES = {"run.json": lambda run: [run.read_identity, run.searches, run.left_search],
             "search.json": lambda run: [run.read_search],
             "wandb.json": lambda run: [run.read_wandb],
             "finished.json": lambda run: [run.finished_step],
             "ticket.json": lambda run: [lambda: run.read_ticket(HEADS, FFN), run.ticket_step],
             "checkpoints/latest.json": lambda run: [run.latest_checkpoint],
             "pruned/trainer_state.json": lambda run: [run.read_pruned_state]}


def read_run_file(name: str, root: Path, content: bytes, runs: dict, **_) -> None:
    """RUN/NAME holding `content`: its readers, then everything that reads RUN."""
    run = copy_run(runs, root, pruned=name.startswith("pruned/"))
    path = run.path / name
    path.write_bytes(content)
    for read in RUN_FILES[name](run):
        refused_or_read(read, path, root)
    everything_reading_run(run, root)


@pytest.mark.parametrize("name", list(RUN_FILES))
def test_a_hostile_run_file(name, runs):
    valid = json.loads((runs[True].path / name).read_text()) if name != "finished.json" else {"step": 20}

    @EXAMPLES
    @given(file_contents(valid))
    def check(content):
        with tempfile.TemporaryDirectory() as tmp:
            read_run_file(name, Path(tmp), content, runs)

    check()


def test_search_settings_from_any_record():
    @EXAMPLES
    @given(json_values | mutated(SEARCH.to_record()))
    def check(record):
        try:
            s = SearchSettings.from_record(record, "RUN/search.json")
        except UserError as e:
            assert "RUN/search.json" in str(e)
        else:
            s.check()

    check()


def test_train_state_from_any_dict():
    @EXAMPLES
    @given(json_values | mutated(TrainState(step=3, consumed=4, tokens=5, elapsed=0.5).to_dict()))
    def check(d):
        try:
            TrainState.from_dict(d, "checkpoint client state")
        except UserError as e:
            assert "checkpoint client state" in str(e)

    check()


# ------------------------------------------------------------------ the ticket: the writers' reads

def test_ticket_writers_read_any_ticket(runs):
    """put_ticket replaces what it cannot read (or keeps the same ticket); publish_ticket keeps the
    ticket in place and returns it, or says it is unreadable. Neither leaves anything else."""
    @EXAMPLES
    @given(file_contents(json.loads(runs[False].ticket.read_text())))
    def check(content):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            run = copy_run(runs, root)
            record = ticket_record(30, "fallback", "trainer", run.fingerprint(), *_masks(), [])
            run.ticket.write_bytes(content)
            refused_or_read(lambda: run.publish_ticket(record), run.ticket, root)
            before = tree(root)
            run.put_ticket(record)
            after = tree(root)
            assert {k for k in set(before) | set(after) if before.get(k) != after.get(k)} <= {"run/ticket.json"}
            assert run.ticket.read_bytes() == content or json.loads(run.ticket.read_text()) == record

    check()


# ------------------------------------------------------------------ metrics.jsonl

def test_hostile_metrics_lines(runs):
    line = (any_bytes.filter(lambda b: b"\n" not in b) | json_values.map(dumps)
            | mutated({"step": 3, "phase": "search", "loss": 1.0}).map(dumps))

    @EXAMPLES
    @given(st.lists(line, max_size=5))
    def check(lines):
        with tempfile.TemporaryDirectory() as tmp:
            read_metrics(Path(tmp), b"\n".join(lines), runs)

    check()


def read_metrics(root: Path, content: bytes, runs: dict, **_) -> None:
    run = copy_run(runs, root)
    run.metrics.write_bytes(content)
    refused_or_read(run.read_metrics, run.metrics, root)
    everything_reading_run(run, root)


# ------------------------------------------------------------------ gate snapshots

class Tripwire:
    """Unpickling one calls _fired: a reader that unpickles is caught."""
    fired = []

    def __reduce__(self):
        return (_fired, ())


def _fired():
    Tripwire.fired.append(1)
    return 0


def npz_bytes(arrays: dict) -> bytes:
    with tempfile.TemporaryFile() as f:
        np.savez(f, **arrays)
        f.seek(0)
        return f.read()


def zip_bytes(members: dict) -> bytes:
    with tempfile.TemporaryFile() as f:
        with zipfile.ZipFile(f, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)
        f.seek(0)
        return f.read()


dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int8, np.uint64, np.bool_, np.complex64,
                          np.dtype("U3"), np.dtype("S2"), np.dtype([("a", "f4"), ("b", "i2")]),
                          np.dtype("datetime64[s]")])
arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=17)))
member_names = st.sampled_from([f"{p}_{i}" for p in ("heads", "ffn") for i in range(3)] + ["step", "x"])


@st.composite
def snapshot_contents(draw):
    valid = {f"heads_{i}": np.random.default_rng(i).random(n).astype(np.float32) for i, n in enumerate(HEADS)}
    valid.update({f"ffn_{i}": np.random.default_rng(9 + i).random(n).astype(np.float32) for i, n in enumerate(FFN)})
    kind = draw(st.sampled_from(["bytes", "cut", "npy", "zip", "arrays", "arrays", "object", "nan"]))
    if kind == "bytes":
        return draw(any_bytes)
    if kind == "cut":  # a valid snapshot cut short
        whole = npz_bytes(valid)
        return whole[:draw(st.integers(0, len(whole) - 1))]
    if kind == "npy":  # one array, not an archive
        with tempfile.TemporaryFile() as f:
            np.save(f, draw(arrays))
            f.seek(0)
            return f.read()
    if kind == "zip":
        names = member_names.map(lambda n: n + ".npy") | st.text("abhfs_.0123456789", min_size=1, max_size=8)
        return zip_bytes(draw(st.dictionaries(names, st.binary(max_size=64), max_size=4)))
    if kind == "arrays":  # some members replaced, dropped or added
        changes = draw(st.dictionaries(member_names, arrays, max_size=3))
        dropped = draw(st.sets(member_names, max_size=2))
        return npz_bytes({k: v for k, v in {**valid, **changes}.items() if k not in dropped})
    if kind == "object":  # pickled: must be refused without unpickling
        name = draw(member_names)
        return npz_bytes({**valid, name: np.array([Tripwire(), 1.0], dtype=object)})
    name = draw(st.sampled_from(sorted(valid)))
    bad = valid[name].copy()
    bad[draw(st.integers(0, len(bad) - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return npz_bytes({**valid, name: bad})


def test_hostile_gate_snapshots(runs):
    @EXAMPLES
    @given(snapshot_contents(),
           st.sets(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\0"), max_size=6), max_size=2))
    def check(content, odd_names):
        Tripwire.fired.clear()
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            run = copy_run(runs, root)
            path = run.gates / "step-0000020.npz"
            path.write_bytes(content)
            for name in odd_names:  # names snapshot_paths skips, or finds and read_snapshot refuses
                (run.gates / f"step-{name}.npz").write_bytes(content)
            (run.gates / "step-0000025.npz").mkdir()
            refused_or_read(lambda: RunDir.read_snapshot(path, len(HEADS)), path, root)
            refused_or_read(lambda: RunDir.read_snapshot(path, len(HEADS), (HEADS, FFN)), path, root)
            for _, p in refused_or_read(run.snapshot_paths, run.gates, root):
                refused_or_read(lambda: RunDir.read_snapshot(p, len(HEADS), (HEADS, FFN)), p, root)
            everything_reading_run(run, root)
        assert not Tripwire.fired, "a snapshot was unpickled"

    check()


def test_a_pickled_snapshot_is_refused_unread(tmp_path):
    path = tmp_path / "step-0000001.npz"
    path.write_bytes(npz_bytes({"heads_0": np.array([Tripwire()], dtype=object), "ffn_0": np.ones(3)}))
    Tripwire.fired.clear()
    with pytest.raises(UserError, match="step-0000001.npz"):
        RunDir.read_snapshot(path, 1)
    assert not Tripwire.fired


# ------------------------------------------------------------------ model configs and pretrained weights

def test_hostile_model_configs():
    ours = CONFIG.to_dict()
    hf_uniform = hf_config_dict(BertConfig(vocab_size=100, hidden_size=16, heads=[4, 4], ffn=[32, 32], head_size=4))
    hf_earlybert = hf_config_dict(CONFIG)
    assert "earlybert_heads" in hf_earlybert and "earlybert_heads" not in hf_uniform

    @EXAMPLES
    @given(contents | mutated(ours).map(dumps) | mutated(hf_uniform).map(dumps) | mutated(hf_earlybert).map(dumps))
    def check(content):
        with tempfile.TemporaryDirectory() as tmp:
            read_model_config(Path(tmp), content)

    check()


def read_model_config(root: Path, content: bytes, **_) -> None:
    path = root / "model.json"
    path.write_bytes(content)
    refused_or_read(lambda: BertConfig.from_json(path), path, root)


def test_the_model_recorded_in_run_json(runs):
    """RUN/run.json's `model` object (what pipeline.summary rebuilds the dense config from)."""
    recorded = json.loads(runs[False].run_json.read_text())["model"]

    @EXAMPLES
    @given(json_values | mutated(recorded))
    def check(model):
        try:
            BertConfig.from_dict(model, "RUN/run.json: field 'model'")
        except UserError as e:
            assert "RUN/run.json: field 'model'" in str(e)

    check()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "model"
    export(BertForMLM(CONFIG), out, None)
    return out


def test_hostile_pretrained_directories(exported):
    config = json.loads((exported / "config.json").read_text())
    weights = st.binary(max_size=300) | st.sampled_from([b"", zip_bytes({"archive/data.pkl": b"\x80\x04K\x01."})])

    @EXAMPLES
    @given(st.one_of(file_contents(config).map(lambda c: ("config.json", c)),
                     weights.map(lambda c: ("model.safetensors", c)),
                     weights.map(lambda c: ("pytorch_model.bin", c))))
    def check(change):
        with tempfile.TemporaryDirectory() as tmp:
            read_pretrained(Path(tmp), change[1], exported=exported, name=change[0])

    check()


def read_pretrained(root: Path, content: bytes, exported: Path, name: str = "config.json", **_) -> None:
    """An exported model directory with NAME (config.json or the weights) holding `content`."""
    model = root / "model"
    shutil.copytree(exported, model)
    if name == "pytorch_model.bin":
        (model / "model.safetensors").unlink()
    (model / name).write_bytes(content)
    refused_or_read(lambda: load_pretrained(model), model, root)


# ------------------------------------------------------------------ DeepSpeed configs

def test_hostile_deepspeed_configs():
    valid = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    lamb = json.loads((ROOT / "ds_configs" / "zero0_bf16_lamb.json").read_text())

    @EXAMPLES
    @given(contents | mutated(valid).map(dumps) | mutated(lamb).map(dumps))
    def check(content):
        with tempfile.TemporaryDirectory() as tmp:
            read_ds_config(Path(tmp), content)

    check()


_MODEL = []


def read_ds_config(root: Path, content: bytes, **_) -> None:
    path = root / "ds.json"
    path.write_bytes(content)
    cfg = refused_or_read(lambda: load_ds_config(path, 100, 2), path, root)
    if cfg is None:
        return
    # What the trainer reads itself before DeepSpeed checks the rest (make_engine turns
    # make_optimizer's ValueError and anything deepspeed.initialize raises into UserError).
    assert isinstance(cfg["train_batch_size"], int) and isinstance(cfg["gradient_accumulation_steps"], int)
    training_dtype(cfg)
    bool(cfg.get("fp16", {}).get("enabled"))
    assert cfg.get("zero_optimization", {}).get("stage", 0) in range(-2 ** 63, 2 ** 63)
    if not _MODEL:
        _MODEL.append(BertForMLM(CONFIG))
    try:
        make_optimizer(_MODEL[0], copy.deepcopy(cfg), torch.device("cpu"))
    except ValueError:
        pass


# ------------------------------------------------------------------ data_prep output

def make_data(out: Path) -> dict:
    """A small data_prep output in the build's format (seq_len 16, vocab 100): shards, boundary
    bits, a tokenizer directory, manifest.json."""
    out.mkdir(parents=True)
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    splits = {}
    for split, n in (("train", 3), ("validation", 1)):
        (out / split).mkdir()
        tokens = (np.arange(n * 16, dtype=np.uint16) % 95 + 5).reshape(n, 16)
        bits = np.packbits(np.eye(1, 16, dtype=bool).repeat(n, 0), axis=1)
        np.save(out / split / "shard-00000.npy", tokens)
        np.save(out / split / "shard-00000.boundaries.npy", bits)
        shard = {"path": f"{split}/shard-00000.npy", "sha256": sha256_file(out / split / "shard-00000.npy"),
                 "num_sequences": n,
                 "boundaries": {"path": f"{split}/shard-00000.boundaries.npy",
                                "sha256": sha256_file(out / split / "shard-00000.boundaries.npy")}}
        splits[split] = {"num_sequences": n, "num_tokens": n * 16, "shards": [shard]}
    manifest = {"format_version": 1, "seq_len": 16, "vocab_size": 100, "dtype": "uint16", "tokenizer": "tokenizer",
                "special_tokens": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, "seed": 0,
                "boundaries_format": "packbits", "sources": [], "splits": splits}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def test_the_hand_made_data_is_valid(tmp_path):
    make_data(tmp_path / "data")
    assert check_data(tmp_path / "data", 0)["seq_len"] == 16


def test_hostile_manifests():
    with tempfile.TemporaryDirectory() as tmp:
        valid = make_data(Path(tmp) / "data")

    @EXAMPLES
    @given(file_contents(valid))
    def check(content):
        with tempfile.TemporaryDirectory() as tmp:
            read_manifest(Path(tmp), content)

    check()


def read_manifest(root: Path, content: bytes, **_) -> None:
    out = root / "data"
    make_data(out)
    (out / "manifest.json").write_bytes(content)
    refused_or_read(lambda: load_manifest(out), out / "manifest.json", root)
    refused_or_read(lambda: check_data(out, 0), out, root)
    refused_or_read(lambda: check_data(out, 1), out, root)


# ------------------------------------------------------------------ every special content in every JSON file

READERS = {**{name: functools.partial(read_run_file, name) for name in RUN_FILES}, "metrics.jsonl": read_metrics,
           "model config": read_model_config, "pretrained config.json": read_pretrained,
           "DeepSpeed config": read_ds_config, "manifest.json": read_manifest}


@pytest.mark.parametrize("kind", list(READERS))
def test_every_special_content(kind, runs, exported):
    """Each of SPECIAL_BYTES (which the strategies draw only now and then) in each JSON file."""
    for content in SPECIAL_BYTES:
        with tempfile.TemporaryDirectory() as tmp:
            READERS[kind](Path(tmp), content, runs=runs, exported=exported)
