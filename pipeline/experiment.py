"""EarlyBERT against the dense model at one budget, and the ticket against a random one:

    python -m pipeline.experiment --out EXP --arms dense,earlybert,random[,rewind] --budget_steps N
        [--slurm "SBATCH ARGS"] [any pipeline/train.py flag, shared by every arm]

Every arm is a run directory EXP/<arm>/ trained for N steps through slurm/pretrain.sh, with the
same data, model, DeepSpeed config and seed (the shared flags):
  dense      --earlybird off: the dense model
  earlybert  the search, the early-bird rule's ticket, the efficient stage on the pruned model
  random     a branch of earlybert at its ticket: the same dense checkpoint, a seeded random
             ticket of the same per-layer shape (--ticket random)
  rewind     a branch likewise: the ticket's masks on the weights from before the search
             (--ticket_weights rewind)
A branch starts as a copy of the earlybert arm as it was at its ticket (the dense checkpoint
ticket-N hard-linked, the metrics rows, gate snapshots and launches up to it), resumed with the
branch's flag: the searching stage is trained once, and the arms differ only in the ticket.

Here the arms run one after another, after DeepSpeed's JIT-compiled op (CPU collectives) is built
once, so that no arm's wall clock carries a one-time compile. With --slurm "SBATCH ARGS" each arm
is a Slurm job (a branch's job starts after the earlybert arm's, then a job writes the report).
The same command again continues what is unfinished (a job still queued or running is left alone)
and does nothing once every arm is finished. Then EXP/report.json, EXP/report.md and the plots are (re)written:
per arm the final validation loss and accuracy, wall clock (RUN/launches.jsonl: every launch,
start-up, evaluation and the relaunch included), training FLOPs, tokens, parameters, median step
times, ticket step and shape; and the verdicts: time saved, validation loss gap, when earlybert
reached the dense arm's final loss, the dense arm's loss at earlybert's end, ticket vs random.

Bad input (an unknown arm, a flag the harness sets, an EXP made with other settings, a branch
without an earlybert arm) exits 2 before anything runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from data_prep.files import atomic_write_bytes, atomic_write_json, fsync_dir, fsync_tree
from pipeline.engine import build_model, build_ops, check_data, load_ds_config
from pipeline.errors import UserError, exit_on_user_error
from pipeline.run_dir import RunDir
from pipeline.settings import json_object
from pipeline.summary import summarise

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "slurm" / "pretrain.sh"
ARMS = ("dense", "earlybert", "random", "rewind")  # the order they run in here
ARM_FLAGS = {"dense": ["--earlybird", "off"], "earlybert": ["--earlybird", "on"],
             "random": ["--ticket", "random"], "rewind": ["--ticket_weights", "rewind"]}
BRANCHES = ("random", "rewind")
# Set by the harness per arm: a shared flag may not name them.
RESERVED = ("--run_dir", "--max_steps", "--earlybird", "--ticket", "--ticket_weights", "--local_rank")
# Not part of the experiment's identity: set per arm, or free to change between launches as in a RUN.
FREE = ("run_dir", "ticket", "ticket_weights", "earlybird", "max_time", "prefetch", "keep_checkpoints",
        "checkpoint_every", "log_every", "compile")


# ------------------------------------------------------------------ the command line

def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", type=Path, required=True, help="the experiment directory (EXP)")
    p.add_argument("--arms", required=True, help="comma-separated: " + ", ".join(ARMS))
    p.add_argument("--budget_steps", type=int, required=True, help="optimizer steps of every arm")
    p.add_argument("--slurm", metavar="SBATCH_ARGS", help="submit each arm as a Slurm job with these sbatch flags")
    p.add_argument("--report_only", action="store_true", help="write the report from what EXP holds; train nothing")
    p.add_argument("--branch_only", action="store_true",
                   help="make the branches of --arms and train nothing (a branch's Slurm job runs this, then "
                        "slurm/pretrain.sh)")
    a, shared = p.parse_known_args(argv)
    try:
        a.arm_list = check_arms(a.arms)
        if a.budget_steps < 1:
            raise UserError(f"--budget_steps {a.budget_steps}: must be at least 1")
        for flag in shared:
            if flag.split("=")[0] in RESERVED:
                raise UserError(f"{flag.split('=')[0]}: set by the harness for each arm; leave it out")
    except UserError as e:
        p.error(str(e))
    return a, shared


def check_arms(text: str) -> list[str]:
    arms = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in arms if x not in ARMS]
    if unknown or not arms:
        raise UserError(f"--arms {text!r}: unknown arm {', '.join(unknown) or '(none given)'}; "
                        f"the arms are {', '.join(ARMS)}")
    return [x for x in ARMS if x in arms]


def settings_of(shared: list[str], exp: Path, budget: int) -> dict:
    """The shared flags as the trainer reads them, checked as it checks them before writing
    anything (its usage errors; the DeepSpeed config, the data's manifest and shards' shapes, the
    model), as the experiment's identity: what every arm of EXP must share."""
    from pipeline.train import parse_args  # the trainer's parser (it imports DeepSpeed)
    train, search = parse_args([*shared, "--run_dir", str(exp / "arm"), "--max_steps", str(budget)])
    if (train.earlybird, search.ticket, search.ticket_weights) != ("on", "rule", "carry"):
        raise UserError("--earlybird, --ticket and --ticket_weights (abbreviated too) are set by the harness for "
                        "each arm; leave them out")
    load_ds_config(train.deepspeed_config, budget, world=1)
    manifest = check_data(train.data, rank=1)  # shapes only: each arm's rank 0 hashes the shards
    if train.init_from is None:
        with torch.device("meta"):  # the configuration alone, no weights
            build_model(train, search, manifest)
    values = {**vars(train), **search.to_record()}
    if Path(train.model).is_file():
        values["model"] = Path(train.model)
    return {k: str(v.resolve()) if isinstance(v, Path) else v for k, v in sorted(values.items())
            if k not in FREE and not k.startswith("wandb_")}


class Experiment:
    def __init__(self, out: Path, budget: int, shared: list[str]):
        self.out, self.budget, self.shared = out, budget, shared
        self.record = out / "experiment.json"
        self.jobs = out / "jobs.json"

    def run_dir(self, arm: str) -> RunDir:
        return RunDir(self.out / arm)

    def arm_args(self, arm: str) -> list[str]:
        flags = [*self.shared, "--run_dir", str(self.out / arm), "--max_steps", str(self.budget), *ARM_FLAGS[arm]]
        named = {f.split("=")[0] for f in self.shared}
        if "--wandb_project" in named and "--wandb_group" not in named:
            flags += ["--wandb_group", f"experiment-{self.out.resolve().name}"]  # the arms: one W&B group
        return flags

    def finished(self, arm: str) -> bool:
        done = self.run_dir(arm).finished_step()
        return done is not None and done >= self.budget

    # -- checks, before anything runs
    def check(self, arms: list[str], identity: dict) -> list[str]:
        """Refuses an EXP made with other settings and a branch with no earlybert arm; returns
        every arm EXP holds or will hold (those of earlier commands too)."""
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is not a directory")
        before = []
        if self.record.exists():
            rec = json_object(self.record)
            if rec.get("budget_steps") != self.budget or rec.get("settings") != identity:
                was = rec.get("settings") if isinstance(rec.get("settings"), dict) else {}
                diff = sorted(k for k in set(was) | set(identity) if was.get(k) != identity.get(k))
                if rec.get("budget_steps") != self.budget:
                    diff.insert(0, f"budget_steps ({rec.get('budget_steps')} there)")
                raise UserError(f"{self.record}: this experiment was made with other settings "
                                f"(differs in {', '.join(map(str, diff))}); use a new --out")
            before = [a for a in rec.get("arms", []) if a in ARMS]
        every = [a for a in ARMS if a in arms or a in before]
        branches = [a for a in arms if a in BRANCHES]
        if branches and "earlybert" not in every and not (self.out / "earlybert").exists():
            raise UserError(f"--arms {','.join(arms)}: {', '.join(branches)} branch from the earlybert arm "
                            f"at its ticket, and {self.out / 'earlybert'} does not exist: add earlybert to --arms")
        return every

    def write_record(self, every: list[str], identity: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.record, {"budget_steps": self.budget, "settings": identity, "arms": every,
                                        "shared_flags": self.shared})

    # -- branches
    def branch(self, arm: str) -> None:
        """EXP/<arm>/ as the earlybert arm was at its ticket, made aside and renamed into place."""
        src, dst = self.run_dir("earlybert"), self.out / arm
        if dst.exists():
            return
        if not src.pruned_ready():
            raise UserError(f"the {arm} arm branches from the earlybert arm at its ticket: {src.pruned} is not "
                            "written yet (its search has not ended)")
        state = src.read_pruned_state()["state"]
        found = src.ticket_checkpoint(state.step)
        if found is None:
            raise UserError(f"{src.checkpoints}: no dense checkpoint of the ticket's step {state.step} "
                            "(ticket-N; a run of an older version rotated it away): the branch cannot start")
        tag, step = found
        tmp = self.out / f".{arm}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "checkpoints").mkdir(parents=True)
        for name in ("run.json", "search.json", "ticket.json"):
            if (src.path / name).exists():
                shutil.copy2(src.path / name, tmp / name)
        if src.init_weights.exists():
            link_or_copy(src.init_weights, tmp / src.init_weights.name)
        (tmp / "gates").mkdir()
        for s, path in src.snapshot_paths():
            if s <= step:
                shutil.copy2(path, tmp / "gates" / path.name)
        for f in (src.checkpoints / tag).rglob("*"):  # checkpoints are never rewritten: links are safe
            target = tmp / "checkpoints" / tag / f.relative_to(src.checkpoints / tag)
            if f.is_dir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(f, target)
        atomic_write_json(tmp / "checkpoints" / "latest.json", {"tag": tag, "step": step, "phase": "search"})
        rows = [r for r in src.read_metrics() if r.get("step", 0) <= step]
        atomic_write_bytes(tmp / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
        launches = [x for x in src.read_launches() if x.get("stage") == "search"]
        atomic_write_bytes(tmp / "launches.jsonl", "".join(json.dumps(x) + "\n" for x in launches).encode())
        fsync_tree(tmp)
        os.replace(tmp, dst)
        fsync_dir(self.out)
        print(f"experiment: {dst} branched from {src.path} at its ticket (step {step})", file=sys.stderr)

    # -- running the arms
    def read_jobs(self) -> dict:
        """EXP/jobs.json: the Slurm job of each arm (and of the report) that --slurm submitted."""
        return json_object(self.jobs) if self.jobs.exists() else {}

    def run_here(self, arms: list[str]) -> int:
        env = dict(os.environ)
        env.setdefault("PYTHON", sys.executable)
        jobs = self.read_jobs()
        if not all(self.finished(arm) for arm in arms):
            build_ops()  # a one-time compile is no arm's cost
        for arm in arms:
            if self.finished(arm):
                print(f"experiment: {arm}: finished at step {self.budget}", file=sys.stderr)
                continue
            if alive(jobs.get(arm)):  # two trainers must never share a RUN
                raise UserError(f"{self.out / arm}: its Slurm job {jobs[arm]} is queued or running "
                                f"({self.jobs}); wait for it or scancel it")
            if arm in BRANCHES:
                self.branch(arm)
            print(f"experiment: {arm}: slurm/pretrain.sh {shlex.join(self.arm_args(arm))}", file=sys.stderr, flush=True)
            rc = run_forwarding_signals(["bash", str(PRETRAIN), *self.arm_args(arm)], env)
            if rc != 0:
                print(f"experiment: {arm}: slurm/pretrain.sh exited {rc}; {self.out / arm} keeps its state: run "
                      "the same command again to continue", file=sys.stderr)
                return rc
        return 0

    def branch_job(self, arm: str, me: list[str]) -> Path:
        """EXP/jobs/<arm>.sh: slurm/pretrain.sh's #SBATCH header (its resources, warning signal and
        requeue), then the branch made (once) and slurm/pretrain.sh exec'd, so Slurm's signals
        reach it as in any pretrain.sh job."""
        header = [x for x in PRETRAIN.read_text().splitlines() if x.startswith("#SBATCH")]
        script = self.out / "jobs" / f"{arm}.sh"
        script.parent.mkdir(parents=True, exist_ok=True)
        lines = ["#!/usr/bin/env bash", *header, "set -eu", f"cd {shlex.quote(os.getcwd())}",
                 f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
                 shlex.join([*me, "--arms", arm, "--branch_only"]),
                 f"exec bash {shlex.quote(str(PRETRAIN))} {shlex.join(self.arm_args(arm))}"]
        atomic_write_bytes(script, ("\n".join(lines) + "\n").encode())
        return script

    def submit(self, arms: list[str], sbatch_args: str, argv: list[str]) -> int:
        """One Slurm job per unfinished arm (none for an arm whose job is still queued or running),
        a branch's after the earlybert arm's, then the report's after all of them (one job, unless
        one is still waiting for the same arms). Returns the arms' jobs queued or running."""
        jobs = self.read_jobs()
        logs = self.out / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, LOG_DIR=str(logs))
        env.setdefault("PYTHON", sys.executable)
        me = [env["PYTHON"], "-m", "pipeline.experiment", *without_slurm(argv)]
        ids = []
        for arm in arms:
            if self.finished(arm):
                continue
            if alive(jobs.get(arm)):
                ids.append(jobs[arm])
                print(f"experiment: {arm}: job {jobs[arm]} is still queued or running", file=sys.stderr)
                continue
            cmd = ["sbatch", "--parsable", "--job-name", f"exp-{arm}", "--output", str(logs / f"{arm}-%j.out"),
                   *shlex.split(sbatch_args)]
            if arm in BRANCHES:  # made in the job, once the earlybert arm has its ticket
                after = jobs.get("earlybert") if alive(jobs.get("earlybert")) else None
                cmd += [f"--dependency=afterany:{after}"] if after else []
                cmd += [str(self.branch_job(arm, me))]
            else:
                cmd += [str(PRETRAIN), *self.arm_args(arm)]
            jobs[arm] = sbatch(cmd, env)
            ids.append(jobs[arm])
            atomic_write_json(self.jobs, jobs)
            print(f"experiment: {arm}: submitted job {jobs[arm]}", file=sys.stderr)
        if not ids:
            print("experiment: every arm is finished", file=sys.stderr)
        elif not alive(jobs.get("report")) or any(j not in jobs.get("report_after", []) for j in ids):
            jobs["report_after"] = ids
            jobs["report"] = sbatch(["sbatch", "--parsable", "--job-name", "exp-report", "--output",
                                     str(logs / "report-%j.out"), f"--dependency=afterany:{':'.join(ids)}",
                                     *shlex.split(sbatch_args), "--wrap",
                                     f"cd {shlex.quote(os.getcwd())} && PYTHONPATH={shlex.quote(str(ROOT))} "
                                     + shlex.join([*me, "--report_only"])], env)
            atomic_write_json(self.jobs, jobs)
            print(f"experiment: the report's job {jobs['report']} writes {self.out / 'report.md'} once they end",
                  file=sys.stderr)
        return len(ids)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copy2(src, dst)


def run_forwarding_signals(cmd: list[str], env: dict) -> int:
    """cmd's exit status; SIGINT and SIGTERM to this process are passed on to it and it is waited
    for (slurm/pretrain.sh then checkpoints, records the launch and stops its monitor)."""
    proc = subprocess.Popen(cmd, env=env)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    before = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def without_slurm(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--slurm":
            skip = True
        elif not x.startswith("--slurm="):
            out.append(x)
    return out


def sbatch(cmd: list[str], env: dict) -> str:
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("--slurm: sbatch is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"sbatch did not answer in 120 s (the job may be queued: see squeue): {shlex.join(cmd)}") from None
    if r.returncode != 0:
        raise UserError(f"sbatch refused the job ({r.stderr.strip()[-500:]}): {shlex.join(cmd)}")
    return r.stdout.strip().split(";")[0]


def alive(job: str | None) -> bool:
    if not job:
        return False
    try:  # squeue lists pending and running jobs; an ended one is not listed, a forgotten one is invalid
        r = subprocess.run(["squeue", "-h", "-j", str(job), "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        raise UserError(f"cannot ask squeue about job {job} ({e})") from None
    if r.returncode != 0 and "invalid job id" not in r.stderr.lower():
        raise UserError(f"cannot ask squeue about job {job} ({r.stderr.strip()[-300:]}): try again when Slurm answers")
    return r.returncode == 0 and bool(r.stdout.strip())


# ------------------------------------------------------------------ the report

def wall_clock(t: float, launches: list[dict]) -> float:
    """Seconds of the run's launches before wall-clock time t (the gaps between launches, and
    the time before a branch's own launches, do not count)."""
    before = 0.0
    for x in launches:
        if t < x["start"]:
            break
        if t <= x["end"]:
            return before + t - x["start"]
        before += x["end"] - x["start"]
    return before


def arm_report(run: RunDir, budget: int) -> dict:
    s = summarise(run)
    rows, launches = run.read_metrics(), run.read_launches()
    trained = [r for r in rows if "step_time_s" in r and not r.get("nonfinite")]
    vals = [r for r in rows if "val_loss" in r and "time" in r]
    median = s["median_step_time_s"]
    return {
        "finished": s["finished"] is not None and s["finished"] >= budget,
        "final_val_loss": s.get("final_val_loss"), "final_val_accuracy": s.get("final_val_accuracy"),
        # None without RUN/launches.jsonl (an arm trained by an older slurm/pretrain.sh, or only
        # launches killed before they could be recorded): no time verdict is drawn from it
        "wall_s": sum(x["end"] - x["start"] for x in launches) or None, "launches": len(launches),
        "train_flops": trained[-1].get("train_flops") if trained else None,
        "tokens": trained[-1]["tokens"] if trained else None,
        "params": s.get("parameters_pruned", s["parameters_dense"]),
        "step_s_search": median.get("search"), "step_s_efficient": median.get("efficient"),
        "step_s_dense": median.get("dense"),
        "ticket_step": s.get("ticket_step"), "ticket": s.get("ticket"), "ticket_weights": s.get("ticket_weights"),
        "heads": s.get("kept_heads", s["heads_dense"]), "ffn": s.get("ffn_width", s["ffn_dense"]),
        # the validation curve: [wall-clock seconds into the arm, step, loss]
        "curve": [[round(wall_clock(r["time"], launches), 3), r["step"], r["val_loss"]] for r in vals],
    }


def first_time_at_or_below(curve: list, target: float) -> float | None:
    """Wall clock at which the curve first reaches `target`, linearly interpolated."""
    prev = None
    for t, _, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return t
            return prev[0] + (t - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = (t, loss)
    return None


def value_at(curve: list, t: float) -> float | None:
    """The curve's loss at wall clock t, interpolated; None outside it."""
    for (t0, _, a), (t1, _, b) in zip(curve, curve[1:]):
        if t0 <= t <= t1:
            return a if t1 == t0 else a + (b - a) * (t - t0) / (t1 - t0)
    return curve[-1][2] if curve and curve[-1][0] == t else None


def verdicts(arms: dict) -> dict:
    d, e, r, w = (arms.get(k) for k in ARMS)
    done = lambda a: a is not None and a["finished"] and a["final_val_loss"] is not None  # noqa: E731
    out = dict.fromkeys(("time_saved", "val_loss_gap", "time_to_dense_loss_s", "dense_loss_at_earlybert_end",
                         "ticket_vs_random", "rewind_vs_carry"))
    if done(d) and done(e):
        out["val_loss_gap"] = (e["final_val_loss"] - d["final_val_loss"]) / d["final_val_loss"]
        if d["wall_s"] and e["wall_s"]:
            out["time_saved"] = 1 - e["wall_s"] / d["wall_s"]
            out["time_to_dense_loss_s"] = first_time_at_or_below(e["curve"], d["final_val_loss"])
            out["dense_loss_at_earlybert_end"] = value_at(d["curve"], e["wall_s"])
    if done(e) and done(r):
        out["ticket_vs_random"] = e["final_val_loss"] - r["final_val_loss"]  # < 0: the ticket is better
    if done(e) and done(w):
        out["rewind_vs_carry"] = w["final_val_loss"] - e["final_val_loss"]
    return out


def plot(arms: dict, out: Path) -> list[str]:
    import matplotlib  # as the monitor: only the report's plots need it, and files only (no display)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    for x, label, name in ((0, "wall clock (s)", "val_loss_vs_wall.png"), (1, "optimizer step", "val_loss_vs_steps.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for arm, a in arms.items():
            if a["curve"]:
                ax.plot([c[x] for c in a["curve"]], [c[2] for c in a["curve"]], marker="o", label=arm)
        ax.set_xlabel(label)
        ax.set_ylabel("validation MLM loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def render(exp: Experiment, arms: dict, v: dict, plots: list[str]) -> str:
    lines = [f"# EarlyBERT experiment: {exp.out}", "",
             f"Every arm: {exp.budget} steps, shared flags `{shlex.join(exp.shared)}`.", "",
             "| arm | finished | val loss | val acc | wall (s) | launches | TFLOPs | params | step s (search / "
             "efficient / dense) | ticket step | heads | FFN |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        steps = " / ".join(fmt(a[k], ".3f") for k in ("step_s_search", "step_s_efficient", "step_s_dense"))
        tflops = None if a["train_flops"] is None else a["train_flops"] / 1e12
        lines.append(f"| {arm} | {'yes' if a['finished'] else 'no'} | {fmt(a['final_val_loss'])} | "
                     f"{fmt(a['final_val_accuracy'])} | {fmt(a['wall_s'], '.1f')} | {a['launches']} | "
                     f"{fmt(tflops, '.3g')} | {a['params']:,} | {steps} | {fmt(a['ticket_step'], 'd')} | "
                     f"{a['heads']} | {a['ffn']} |")
    lines += ["", "## Verdicts", ""]
    if v["val_loss_gap"] is not None and v["time_saved"] is None:
        lines.append("- Time: unknown (an arm has no RUN/launches.jsonl: trained by an older slurm/pretrain.sh).")
        lines.append(f"- Validation loss gap: {v['val_loss_gap']:+.2%} (EarlyBERT vs dense, relative).")
    elif v["time_saved"] is not None:
        ratio = 1 - v["time_saved"]
        lines.append(f"- Time saved: EarlyBERT took {ratio:.2f} x the dense arm's wall clock ({v['time_saved']:.1%} "
                     "saved)." if ratio <= 1 else f"- Time saved: none; EarlyBERT took {ratio:.2f} x the dense arm's "
                     "wall clock (the search's snapshots, the prune and the relaunch cost more than the smaller "
                     "model saved at this size and length).")
        lines.append(f"- Validation loss gap: {v['val_loss_gap']:+.2%} (EarlyBERT vs dense, relative).")
        reached = v["time_to_dense_loss_s"]
        lines.append(f"- EarlyBERT reached the dense arm's final validation loss after {reached:.1f} s." if reached
                     is not None else "- EarlyBERT never reached the dense arm's final validation loss.")
        at_end = v["dense_loss_at_earlybert_end"]
        lines.append(f"- The dense arm's validation loss at EarlyBERT's end: {at_end:.4f}." if at_end is not None
                     else "- The dense arm's validation curve does not span EarlyBERT's end "
                          f"({arms['earlybert']['wall_s']:.1f} s).")
    else:
        lines.append("- Time and quality: needs both the dense and the earlybert arm finished.")
    if v["ticket_vs_random"] is not None:
        better = "better" if v["ticket_vs_random"] < 0 else "not better"
        lines.append(f"- Ticket vs random at {exp.budget} steps: {v['ticket_vs_random']:+.4f} validation loss "
                     f"(the early-bird ticket is {better} than a random one of its shape).")
    if v["rewind_vs_carry"] is not None:
        lines.append(f"- Rewound vs carried weights: {v['rewind_vs_carry']:+.4f} validation loss.")
    lines += ["", "Wall clock counts every launch of an arm (start-up, evaluation, prune and relaunch); a "
              "branch counts the earlybert arm's search launches and its own.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(exp: Experiment, every: list[str]) -> dict | None:
    arms = {arm: arm_report(exp.run_dir(arm), exp.budget) for arm in every if exp.run_dir(arm).run_json.exists()}
    if not arms:
        return None
    v = verdicts(arms)
    plots = plot(arms, exp.out)
    report = {"budget_steps": exp.budget, "shared_flags": exp.shared, "arms": arms, "verdicts": v, "plots": plots}
    atomic_write_json(exp.out / "report.json", report)
    atomic_write_bytes(exp.out / "report.md", render(exp, arms, v, plots).encode())
    return report


@exit_on_user_error
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a, shared = parse(argv)
    exp = Experiment(a.out, a.budget_steps, shared)
    identity = settings_of(shared, a.out, a.budget_steps)
    every = exp.check(a.arm_list, identity)
    if a.report_only:
        report = write_report(exp, every)
        print(f"experiment: {exp.out / 'report.md'}" if report else f"experiment: {exp.out} has no arm yet",
              file=sys.stderr)
        return 0
    exp.write_record(every, identity)
    if a.branch_only:
        for arm in a.arm_list:
            if arm in BRANCHES:
                exp.branch(arm)
        return 0
    if a.slurm is not None:
        if exp.submit(a.arm_list, a.slurm, argv) == 0:
            write_report(exp, every)  # nothing left to run: the report as it stands
        return 0
    rc = exp.run_here(a.arm_list)
    report = write_report(exp, every)
    if report is not None:
        print((exp.out / "report.md").read_text(), end="")
    return rc


if __name__ == "__main__":
    sys.exit(main())
