"""pipeline.experiment's mechanics on CPU with bert-tiny: bad input refused before anything runs,
two arms and a branch of the earlybert arm at its ticket, continuation (a rerun trains only what is
missing, then nothing), the report and its plots."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from helpers import ds_config, env, metrics

EXPERIMENT = [sys.executable, "-m", "pipeline.experiment"]


def experiment(*args, timeout=900, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([*EXPERIMENT, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(env(), PYTHON=sys.executable, **extra_env))


def launches(run) -> list[dict]:
    return [json.loads(x) for x in (run / "launches.jsonl").read_text().splitlines()]


def test_arms_branch_continuation_and_report(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    exp = tmp_path / "exp"
    # The shared flags: every train flag but --run_dir and --max_steps (the harness sets them).
    shared = [str(x) for x in ("--deepspeed_config", cfg, "--data", small_data, "--model", "bert-tiny",
                               "--search_min_steps", 8, "--search_max_steps", 20, "--snapshot_every", 2,
                               "--epsilon", 1.0, "--eval_every", 10, "--checkpoint_every", 5,
                               "--keep_checkpoints", 1, "--dropout", 0)]

    # Bad input: exit 2, a message that names the problem, nothing written.
    for args, needle in ((["--arms", "dense,sparse"], "unknown arm sparse"),
                         (["--arms", "dense", "--max_steps", "9"], "--max_steps: set by the harness"),
                         (["--arms", "random"], "add earlybert to --arms"),
                         (["--arms", "dense", "--model", "bert-nonexistent"], "bert-nonexistent")):
        r = experiment("--out", exp, "--budget_steps", 30, *shared, *args)
        assert r.returncode == 2 and needle in r.stderr, (args, r.stderr[-2000:])
        assert not exp.exists()

    # A fresh torch extension cache: DeepSpeed's CPU collectives op is compiled (about 40 s) before
    # the first arm starts, not inside the dense arm's wall clock.
    ext = tmp_path / "torch_extensions"
    r = experiment("--out", exp, "--arms", "dense,earlybert", "--budget_steps", 30, *shared,
                   TORCH_EXTENSIONS_DIR=str(ext))
    assert r.returncode == 0, r.stderr[-4000:]
    dense, eb = exp / "dense", exp / "earlybert"
    built = list(ext.rglob("*.so"))
    assert built and max(x.stat().st_mtime for x in built) < launches(dense)[0]["start"], built
    assert json.loads((dense / "finished.json").read_text())["step"] == 30
    assert {x["phase"] for x in metrics(dense) if "loss" in x} == {"dense"}
    ticket = json.loads((eb / "pruned" / "trainer_state.json").read_text())
    step = ticket["state"]["step"]
    assert ticket["ticket_step"] == step == 10 and ticket["ticket"] == "rule"
    # The dense checkpoint at the ticket outlives the rotation (--keep_checkpoints 1).
    assert (eb / "checkpoints" / f"ticket-{step:07d}").is_dir() and (eb / "init.safetensors").exists()
    assert [x["stage"] for x in launches(eb)] == ["search", "efficient"]
    report = json.loads((exp / "report.json").read_text())
    assert set(report["arms"]) == {"dense", "earlybert"}
    d, e = report["arms"]["dense"], report["arms"]["earlybert"]
    assert d["finished"] and e["finished"] and e["params"] < d["params"] and e["ticket_step"] == 10
    assert e["train_flops"] < d["train_flops"] and e["tokens"] == d["tokens"]  # the same batches
    assert [c[1] for c in e["curve"]] == [10, 20, 30] and e["curve"][-1][0] <= e["wall_s"]
    v = report["verdicts"]
    assert v["time_saved"] == pytest.approx(1 - e["wall_s"] / d["wall_s"])
    assert v["val_loss_gap"] == pytest.approx((e["final_val_loss"] - d["final_val_loss"]) / d["final_val_loss"])
    assert v["ticket_vs_random"] is None

    # Other settings for the same EXP: refused.
    r = experiment("--out", exp, "--arms", "dense", "--budget_steps", 40, *shared)
    assert r.returncode == 2 and "other settings" in r.stderr and "budget_steps" in r.stderr

    # A branch added to the experiment: only it trains, from the earlybert arm's ticket.
    before = {arm: launches(exp / arm) for arm in ("dense", "earlybert")}
    r = experiment("--out", exp, "--arms", "dense,earlybert,random", "--budget_steps", 30, *shared)
    assert r.returncode == 0, r.stderr[-4000:]
    assert {arm: launches(exp / arm) for arm in before} == before
    rnd = exp / "random"
    state = json.loads((rnd / "pruned" / "trainer_state.json").read_text())
    assert state["ticket"] == "random" and state["ticket_step"] == 10 and state["state"]["step"] == 10
    # the same per-layer shape, other heads or neurons
    assert [sum(h) for h in state["heads"]] == [sum(h) for h in ticket["heads"]]
    assert [sum(f) for f in state["ffn"]] == [sum(f) for f in ticket["ffn"]]
    assert state["ffn"] != ticket["ffn"]
    # the searching stage trained once: the branch's rows up to the ticket are the earlybert arm's
    strip = lambda rows, hi: [r for r in rows if r["step"] <= hi]  # noqa: E731
    assert strip(metrics(rnd), step) == strip(metrics(eb), step)
    assert [r["step"] for r in metrics(rnd) if "loss" in r] == list(range(1, 31))
    assert [x["stage"] for x in launches(rnd)] == ["search", "search", "efficient"]
    report = json.loads((exp / "report.json").read_text())
    assert report["verdicts"]["ticket_vs_random"] == pytest.approx(
        report["arms"]["earlybert"]["final_val_loss"] - report["arms"]["random"]["final_val_loss"])
    md = (exp / "report.md").read_text()
    for needle in ("| dense | yes", "| earlybert | yes", "| random | yes", "Time saved", "Ticket vs random",
                   "val_loss_vs_wall.png"):
        assert needle in md, md
    for png in ("val_loss_vs_wall.png", "val_loss_vs_steps.png"):
        assert (exp / png).read_bytes()[:4] == b"\x89PNG"

    # Again: nothing trains.
    r = experiment("--out", exp, "--arms", "dense,earlybert,random", "--budget_steps", 30, *shared)
    assert r.returncode == 0 and r.stderr.count("finished at step 30") == 3, r.stderr[-2000:]
    assert launches(rnd)[-1]["stage"] == "efficient" and len(launches(rnd)) == 3
