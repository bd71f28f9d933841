"""`sbatch slurm/pretrain.sh` on a real one-node Slurm cluster (started here, see slurm_cluster.py):
the whole EarlyBERT loop, preemption (the warning signal, then `scontrol requeue`) with every step
counted once, and a bad argument failing fast."""
import json
import os
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tree_bytes
from helpers import ds_config, pretrain_env, steps, train_args
from slurm_cluster import SlurmCluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starting Slurm needs root")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def submit(slurm, tmp_path: Path, *train_flags, extra_env=None) -> str:
    """sbatch with the script's GPU-node defaults overridden for this CPU-only node."""
    env = pretrain_env(slurm.env, tmp_path / "logs", **(extra_env or {}))
    r = slurm.cmd(["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={os.cpu_count()}",
                   "--mem=0", f"--output={tmp_path}/%x-%j.out", str(ROOT / "slurm" / "pretrain.sh"),
                   *map(str, train_flags)], cwd=tmp_path, env=env)
    return r.stdout.strip().split(";")[0]


def flags(tmp_path, data, run, max_steps, **more):
    return train_args(ds_config(tmp_path, "cpu.json"), data, run, max_steps=max_steps, snapshot_every=2,
                      eval_every=0, **more)


def test_sbatch_pretrain_whole_loop_as_an_experiment(slurm, tmp_path, small_data):
    """pipeline.experiment --slurm: the earlybert arm is `sbatch slurm/pretrain.sh` (the whole loop),
    the random branch a job after it, then the report's job; submitting again adds no job."""
    exp = tmp_path / "exp"
    shared = ["--deepspeed_config", ds_config(tmp_path, "cpu.json"), "--data", small_data, "--model", "bert-tiny",
              "--snapshot_every", 2, "--eval_every", 20, "--search_max_steps", 16]
    sbatch_args = f"--gpus-per-node=0 --cpus-per-task={os.cpu_count()} --mem=0"
    cmd = [sys.executable, "-m", "pipeline.experiment", "--out", str(exp), "--arms", "earlybert,random",
           "--budget_steps", "40", "--slurm", sbatch_args, *map(str, shared)]
    env = pretrain_env(slurm.env, tmp_path / "unused")
    r = slurm.cmd(cmd, cwd=tmp_path, env=env, timeout=120)
    jobs = json.loads((exp / "jobs.json").read_text())
    assert {"earlybert", "random", "report"} <= set(jobs), r.stderr
    again = slurm.cmd(cmd, cwd=tmp_path, env=env, timeout=120)  # the jobs are queued: none added
    assert "still queued or running" in again.stderr
    assert json.loads((exp / "jobs.json").read_text()) == jobs  # no job added, the report's neither
    job, run = jobs["earlybert"], exp / "earlybert"
    result = slurm.wait(job, timeout=400)
    out = (exp / "logs" / f"earlybert-{job}.out").read_text()
    assert result == "COMPLETED" and result.returncode == 0, out[-3000:]
    assert "EarlyBERT run summary" in out and "ticket:           step" in out and "finished:         step 40" in out
    assert json.loads((run / "finished.json").read_text())["step"] == 40
    assert [x["step"] for x in steps(run)] == list(range(1, 41))
    assert {x["phase"] for x in steps(run)} == {"search", "efficient"}
    logs = sorted(p.name for p in (exp / "logs").glob("exp-earlybert-*"))
    assert logs == [f"exp-earlybert-{job}-{s}.log" for s in ("efficient", "monitor", "search")]
    assert "exit 76" in (exp / "logs" / f"exp-earlybert-{job}-search.log").read_text()
    for name in ("random", "report"):
        result = slurm.wait(jobs[name], timeout=400)
        assert result == "COMPLETED", (exp / "logs" / f"{name}-{jobs[name]}.out").read_text()[-3000:]
    assert json.loads((exp / "random" / "pruned" / "trainer_state.json").read_text())["ticket"] == "random"
    job_script = (exp / "jobs" / "random.sh").read_text()  # pretrain.sh's header: signal, requeue
    assert "#SBATCH --signal=B:USR1@300" in job_script and "#SBATCH --requeue" in job_script
    assert f"exp-random-{jobs['random']}-efficient.log" in {p.name for p in (exp / "logs").iterdir()}
    report = json.loads((exp / "report.json").read_text())
    assert report["arms"]["random"]["finished"] and report["verdicts"]["ticket_vs_random"] is not None


def test_preemption_requeues_and_every_step_counts_once(slurm, tmp_path, small_data):
    run = tmp_path / "run"
    job = submit(slurm, tmp_path, *flags(tmp_path, small_data, run, 400, search_max_steps=200,
                                         checkpoint_every=1000))

    def wait_steps(n, timeout=240):
        deadline = time.time() + timeout
        while not ((run / "metrics.jsonl").exists() and len(steps(run)) >= n):
            assert time.time() < deadline and slurm.state(job) in ("PENDING", "RUNNING", "CONFIGURING"), \
                slurm.diagnostics()
            time.sleep(0.3)

    wait_steps(30)
    slurm.cmd(["scancel", "--batch", "--signal=USR1", job])  # Slurm's warning, to the batch shell (B:USR1)
    slurm.wait_state(job, ("PENDING", "REQUEUED", "REQUEUE_HOLD"), timeout=120)
    assert "requeueing job" in (tmp_path / f"earlybert-{job}.out").read_text()
    first = steps(run)[-1]["step"]
    wait_steps(first + 30)  # the requeued job resumed from RUN
    slurm.requeue(job)  # an abrupt requeue, no warning: resume from the last checkpoint
    result = slurm.wait(job, timeout=600)
    out = (tmp_path / f"earlybert-{job}.out").read_text()
    assert result == "COMPLETED" and result.returncode == 0, out[-3000:]
    assert int(result.info["Restarts"]) == 2
    assert [x["step"] for x in steps(run)] == list(range(1, 401))  # strictly increasing, none missing
    assert json.loads((run / "finished.json").read_text())["step"] == 400


def test_bad_argument_fails_fast(slurm, tmp_path, small_data):
    t0 = time.time()
    job = submit(slurm, tmp_path, *flags(tmp_path, small_data, tmp_path / "run", 10, prune_ffn=2))
    result = slurm.wait(job, timeout=180)
    assert result == "FAILED" and time.time() - t0 < 120
    log = (tmp_path / "logs" / f"earlybert-{job}-search.log").read_text()
    assert "--prune_ffn" in log and "must be in [0, 1)" in log
    assert not (tmp_path / "run").exists()


def test_prep_data_array_equals_one_machine_build(slurm, tmp_path, wiki_dump):
    """A trained vocabulary: the array counts words in a first pass, the second pass (submitted
    by the first task) trains the same vocabulary in every task and tokenizes, then the merge."""
    from data_prep.build import BuildArgs, build
    from data_prep.multistream import write_multistream
    dump = tmp_path / "dump"
    write_multistream(wiki_dump, dump, pages_per_stream=5)  # about 9 units of 0.2 MB
    build_flags = ["--source", f"wikipedia:{dump}", "--seq-len", "64", "--val-fraction", "0.05",
                   "--shard-size", "5000", "--vocab-size", "1000", "--unit-mb", "0.2"]
    env = dict(slurm.env, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    array = slurm.cmd(["sbatch", "--parsable", "--array=0-2", "--cpus-per-task=1",
                       str(ROOT / "slurm" / "prep_data.sh"), *build_flags, "--out", str(tmp_path / "array")],
                      cwd=tmp_path, env=env).stdout.strip()
    deadline = time.time() + 400
    while not (tmp_path / "array" / "manifest.json").exists() or slurm.squeue():
        assert time.time() < deadline, slurm.diagnostics()
        time.sleep(1)
    outputs = {p.name: p.read_text() for p in tmp_path.glob("prep_data*.out")}
    assert len(outputs) == 7, outputs  # three tasks twice and the merge, each its own log
    assert sum("pass2" in k for k in outputs) == 3
    merge_log = next(v for k, v in outputs.items() if "merge" in k)
    assert "merging the array tasks' results" in merge_log, merge_log[-2000:]
    assert "the second pass, array job" in "".join(outputs.values())
    assert f"runs after array job {array}" in "".join(outputs.values())
    build(BuildArgs(out=tmp_path / "single", sources=[f"wikipedia:{dump}"], seq_len=64,
                    val_fraction=0.05, shard_size=5000, vocab_size=1000, unit_mb=0.2, workers=2))
    assert tree_bytes(tmp_path / "array") == tree_bytes(tmp_path / "single")


def test_prep_data_refuses_a_stepped_array(slurm, tmp_path, wiki_dump):
    """--array=0-4:2 would leave the units of tasks 1 and 3 to no task: every task exits 2 with a
    message before writing anything, and no merge is submitted."""
    env = dict(slurm.env, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    slurm.cmd(["sbatch", "--parsable", "--array=0-4:2", "--cpus-per-task=1", str(ROOT / "slurm" / "prep_data.sh"),
               "--source", f"wikipedia:{wiki_dump}", "--out", str(tmp_path / "stepped")], cwd=tmp_path, env=env)
    deadline = time.time() + 120
    while len(list(tmp_path.glob("prep_data*.out"))) < 3 or slurm.squeue():
        assert time.time() < deadline, slurm.diagnostics()
        time.sleep(0.5)
    outputs = {p.name: p.read_text() for p in tmp_path.glob("prep_data*.out")}
    assert len(outputs) == 3 and not any("merge" in k for k in outputs), outputs
    assert all("needs consecutive array task ids" in v and "--array=0-2" in v for v in outputs.values()), outputs
    assert not (tmp_path / "stepped").exists()
