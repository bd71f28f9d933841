"""Settings (one class per concern, flags generated from it), RUN's stage as one word, and the code
running as a package: installed, or from a plain checkout through PYTHONPATH with no install."""
import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import ROOT, run_cli
from pipeline.errors import UserError
from pipeline.run_dir import RunDir, SearchRecord
from pipeline.settings import SearchSettings, TrainSettings
from pipeline.train import parse_args

BASE = ["--deepspeed_config", "ds_configs/cpu.json", "--data", "D", "--run_dir", "R", "--model", "bert-tiny",
        "--max_steps", "10"]


def test_every_setting_is_documented_and_a_flag_with_its_default():
    for cls in (TrainSettings, SearchSettings):
        for f in fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} has no help"
    train, search = parse_args(BASE)
    assert search == SearchSettings()  # every EarlyBERT default as the class says
    assert (train.seed, train.eval_every, train.attention, train.earlybird) == (0, 1000, "sdpa", "on")
    _, search = parse_args(BASE + ["--window", "3", "--epsilon", "0.05", "--ticket", "random"])
    assert (search.window, search.epsilon, search.ticket) == (3, 0.05, "random")


@pytest.mark.parametrize("flags,needle", [
    (["--window", "1"], "--window 1"), (["--epsilon", "0"], "--epsilon 0"), (["--prune_ffn", "1.0"], "--prune_ffn"),
    (["--ffn_multiple", "0"], "--ffn_multiple 0"), (["--max_steps", "0"], "--max_steps 0"),
    (["--dropout", "1.5"], "--dropout 1.5"), (["--l1", "-1"], "--l1 -1"), (["--prune_heads", "-2"], "--prune_heads -2")])
def test_a_setting_out_of_range_is_refused_with_its_flag(flags, needle, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(BASE + flags)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_search_json_round_trips_and_an_older_one_still_reads(tmp_path):
    run = RunDir(tmp_path)
    s = SearchSettings(l1=1e-3, search_min_steps=20, ffn_multiple=32, window=4)
    run.write_search(SearchRecord(s, [4, 4], [16, 16]))
    back = run.read_search()
    assert back.settings == s and back.heads == [4, 4] and back.ffn == [16, 16]
    # Written before this change: other names for the bounds, no ffn_multiple (free widths), no rule.
    run.search_json.write_text(json.dumps({"snapshot_every": 10, "min_steps": 60, "max_steps": 300,
                                           "prune_heads": 4, "prune_ffn": 0.3, "l1": 1e-4,
                                           "heads": [12], "ffn": [64]}))
    old = run.read_search().settings
    assert (old.search_min_steps, old.search_max_steps, old.ffn_multiple, old.window) == (60, 300, 1, 5)
    run.search_json.write_text(json.dumps({"ffn_multiple": 0, "heads": [12], "ffn": [64]}))
    with pytest.raises(UserError, match="search.json: --ffn_multiple 0"):
        run.read_search()


def test_stage_of_a_run_directory(tmp_path):
    run = RunDir(tmp_path / "run")

    def stage():
        r = run_cli("-m", "pipeline.run_dir", "--stage", run.path, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == run.stage()
        return r.stdout.strip()

    assert stage() == "new"
    run.path.mkdir()
    run.write_identity({"model": {"gates": True}})
    assert stage() == "search"
    run.pruned.mkdir()
    assert stage() == "search"  # a pruned/ without its trainer_state.json is not finished
    run.pruned_state.write_text("{}")
    assert stage() == "efficient"
    run.write_finished(10)
    assert stage() == "done"


def tracked_files() -> list[str]:
    return subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True).stdout.split()


def test_no_module_edits_sys_path():
    offenders = []
    paths = [ROOT / p for p in tracked_files() if p.endswith(".py")] or sorted(
        p for d in ("pipeline", "data_prep", "bench", "tests") for p in (ROOT / d).rglob("*.py"))
    for path in paths:
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path" and ast.unparse(node.value) == "sys":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_a_plain_checkout_runs_through_pythonpath_without_an_install(tmp_path):
    """A machine without a package index cannot build an editable install: a copy of the tracked
    files, PYTHONPATH pointing at it and the commands run from elsewhere."""
    tracked = tracked_files()
    if not tracked:
        pytest.skip("not a git checkout")
    copy = tmp_path / "checkout"
    for name in tracked + ["pyproject.toml"]:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(copy))
    code = "import pipeline.train, pipeline.monitor, data_prep.build; print(pipeline.train.__file__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == str(copy / "pipeline" / "train.py")  # the copy, not an install
    for module in ("pipeline.train", "pipeline.monitor", "pipeline.summary", "data_prep"):
        r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "usage" in r.stdout, (module, r.stderr[-2000:])
    r = subprocess.run([sys.executable, "-m", "pipeline.run_dir", "--stage", str(tmp_path / "nothing")],
                       cwd=elsewhere, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "new", r.stderr[-2000:]
