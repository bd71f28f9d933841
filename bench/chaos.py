"""The chaos test: the whole EarlyBERT loop killed with SIGKILL at random moments, rerun until it
finishes, and compared with an unbroken run (a benchmark of reliability, not of speed).

    python -m bench.chaos [--trials 100] [--seed 0] [--data DATA] [--out bench/out/chaos.json]
        [--workdir bench/out/chaos] [--keep] [--jobs 1] [--max_launches 10] [--resume]

One unbroken reference run of `bash slurm/pretrain.sh` (search with the monitor beside it,
ticket, prune, relaunch, efficient stage, export, summary) on bert-tiny, on the CPU in fp32 with
dropout 0, so that a resumed run is bit-identical to an unbroken one. Then each trial starts the
same command in a fresh RUN, in a session of its own, and kills it 1 to 3 times, each time with a
kind drawn from the trial's seeded RNG among those that can still land:

    group       the whole session (shell, trainer, monitor) at a seeded moment
    trainer     only the trainer's processes (pretrain.sh then stops with 137, or relaunches
                when the ticket was already written) at a seeded moment
    monitor     only the monitor, as a seeded gate snapshot before the ticket's is written (the
                trainer applies the rule itself, so the run must not notice)
    checkpoint  the whole session while a seeded checkpoint is written (RUN/checkpoints/tmp-*)
    prune       the whole session as RUN/pruned (or its temporary) is written
    export      the whole session as RUN/final (or its temporary) is written

Timed kills (group, trainer) fall at a uniform moment within what the reference run says is left
of the launch; the others once their event is seen (RUN is polled every 5 ms), after a seeded
fraction of the time the reference took over that write (tens of milliseconds), so most land
inside it. A kill whose moment or event does not come before the launch ends is "missed".
After a kill the same command runs again until it exits 0 (at most --max_launches launches).
A finished trial is compared with the reference: the same ticket (step, heads, FFN) and the step
it was taken at, every training step logged once and each validation once, the same losses, LRs
and sample counts per step, bit-identical tensors in RUN/pruned and RUN/final, and the same
summary. "Lost" is anything a kill must never cause: a launch exiting with a code other than
0/75/76/-9/137 after a kill (or other than 0 without one), a Python traceback, latest.json
naming a missing checkpoint, or a run that does not finish.

Prints a table (trials, kill points by stage and kind, runs finished, identical, anything lost,
median reruns, wall time) and writes JSON with every trial's details to --out, after each trial
(--resume keeps the trials already there and runs the rest). Trials run one at a time (--jobs N
for a machine with cores to spare). The data (gensim's shortened Wikipedia dump, a 1000-token
vocabulary, 64 tokens) is built into --workdir once unless --data is given. A trial that fails
keeps its RUN and launch logs in WORKDIR/trials/NNN (--keep: every trial does).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from safetensors.numpy import load_file

from pipeline.run_dir import RunDir

ROOT = Path(__file__).resolve().parent.parent  # the checkout: slurm/, ds_configs/, bench/out/
PRETRAIN = ROOT / "slurm" / "pretrain.sh"
KINDS = ("group", "trainer", "monitor", "checkpoint", "prune", "export")
STAGES = RunDir.STAGES  # new, search, efficient, done
# The run: the rule fires early (epsilon 1.0: any 5 snapshots 2..10 are "stable", from step 8),
# so the search is short and the efficient stage has several checkpoints (every 3 steps) for
# the kills to land near; one unbroken run takes about 30 s on 2 CPU cores, most of it start-up.
RUN_FLAGS = {"model": "bert-tiny", "max_steps": 30, "search_max_steps": 20, "search_min_steps": 8,
             "snapshot_every": 2, "epsilon": 1.0, "checkpoint_every": 3, "eval_every": 15,
             "eval_sequences": 64, "dropout": 0}
EXIT_AFTER_KILL = {0, 75, 76, -signal.SIGKILL, 128 + signal.SIGKILL}  # 137: pretrain.sh's trainer killed
POLL_S = 0.005          # how often RUN and the processes are looked at while waiting for a kill
MONITOR_POLL_S = 0.05   # the monitor's --poll: how often it looks for new snapshots
LAUNCH_TIMEOUT_S = 600  # a launch that runs longer is stuck: killed and counted as lost
# DeepSpeed JIT-builds its shared-memory comm op at every trainer start-up under torch's lock file
# (TORCH_EXTENSIONS_DIR/py311_cpu/deepspeed_shm_comm/lock), which only its holder removes: a
# launch killed while holding it leaves every later launch waiting for ever. A lock that old
# (a build takes ~20 s here) and open in no process is such a leftover.
STALE_LOCK_S = 60
# Per step, what a resumed run must log exactly as the unbroken one did (times differ).
STEP_FIELDS = ("phase", "loss", "lr", "tokens", "samples", "gate_l1")
VAL_FIELDS = ("phase", "val_loss", "val_accuracy")
SUMMARY_FIELDS = ("finished", "ticket_step", "ticket_taken_at", "ticket_reason", "kept_heads", "ffn_width",
                  "parameters_dense", "parameters_pruned", "final_val_loss", "final_val_accuracy", "final_val_step")


# ------------------------------------------------------------------ the run's inputs and command

def build_data(out: Path) -> Path:
    """The tests' small data (tests/conftest.py's small_data): gensim's shortened Wikipedia dump,
    a trained 1000-token vocabulary, 64 tokens per sequence. Built once; reused when present."""
    if (out / "manifest.json").exists():
        return out
    import gensim

    from data_prep.build import BuildArgs, build
    dump = (Path(gensim.__file__).parent / "test" / "test_data" /
            "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    shutil.rmtree(out, ignore_errors=True)
    build(BuildArgs(out=out, sources=[f"wikipedia:{dump}"], vocab_size=1000, seq_len=64, workers=2,
                    val_fraction=0.05))
    return out


def small_ds_config(path: Path) -> Path:
    """ds_configs/cpu.json made small, as tests/helpers.ds_config does: micro batch 4 x 2
    accumulation, 3 warm-up steps to lr 1e-3 (fp32, ZeRO-2 on the CPU)."""
    cfg = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    cfg["scheduler"]["params"]["warmup_num_steps"] = 3
    cfg["optimizer"]["params"]["lr"] = cfg["scheduler"]["params"]["warmup_max_lr"] = 1e-3
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def seed_extensions(dest: Path) -> None:
    """The trials' TORCH_EXTENSIONS_DIR, seeded with this machine's builds (DeepSpeed's shm op)
    so that no launch pays for a compile; without them the first launch builds them."""
    if dest.exists():
        return
    src = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("lock"), dirs_exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)


def stale_locks(extensions: Path) -> list[Path]:
    """Torch extension build locks older than STALE_LOCK_S that no process has open."""
    old = []
    for lock in extensions.glob("*/*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                old.append(lock)
        except OSError:
            continue
    if not old:
        return []
    held = set()
    for p in psutil.process_iter():
        try:
            held.update(f.path for f in p.open_files())
        except psutil.Error:
            continue
    return [lock for lock in old if str(lock) not in held]


@dataclass
class Setup:
    """What every run of a chaos benchmark shares: where it works, the data, the flags."""
    workdir: Path
    data: Path
    ds_config: Path
    flags: dict = field(default_factory=lambda: dict(RUN_FLAGS))
    max_launches: int = 10
    keep: bool = False

    @classmethod
    def make(cls, workdir: Path, data: Path | None = None, **kw) -> "Setup":
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        data = build_data(workdir / "data") if data is None else data.resolve()
        seed_extensions(workdir / "torch_extensions")
        return cls(workdir, data, small_ds_config(workdir / "ds_cpu.json"), **kw)

    @property
    def extensions(self) -> Path:
        return self.workdir / "torch_extensions"

    def command(self, run: Path) -> list[str]:
        flags = {"deepspeed_config": self.ds_config, "data": self.data, "run_dir": run, **self.flags}
        return ["bash", str(PRETRAIN), *(s for k, v in flags.items() for s in (f"--{k}", str(v)))]

    def env(self) -> dict:
        # NPROC=1 and no CUDA: one trainer process on the CPU (fp32, deterministic), and
        # pretrain.sh skips asking torch for the GPU count at every launch.
        # A TORCH_EXTENSIONS_DIR of their own: a lock file a kill leaves (see STALE_LOCK_S) stops
        # only these runs, and other checkouts' builds do not make them rebuild.
        return dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), NPROC="1", CUDA_VISIBLE_DEVICES="",
                    TORCH_EXTENSIONS_DIR=str(self.extensions),
                    WANDB_MODE="disabled", OMP_NUM_THREADS="1", MONITOR_FLAGS=f"--poll {MONITOR_POLL_S}",
                    HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    def checkpoint_steps(self, ticket_step: int) -> list[int]:
        """The steps an unbroken run checkpoints: every --checkpoint_every, the ticket's (before
        pruning) and the last."""
        every, last = self.flags["checkpoint_every"], self.flags["max_steps"]
        return sorted({s for s in range(every, last + 1, every)} | {ticket_step, last})

    def val_steps(self) -> list[int]:
        every, last = self.flags["eval_every"], self.flags["max_steps"]
        return [s for s in range(every, last, every)] + [last] if every else [last]


# ------------------------------------------------------------------ reading RUN

def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(run: Path) -> tuple[list[dict], int]:
    """metrics.jsonl's rows, and how many lines were not valid JSON (a row cut short by a kill
    that no later launch cleaned up)."""
    rows, bad = [], 0
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return [], 0
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad += 1
    return rows, bad


def last_step(run: Path) -> int:
    rows, _ = read_metrics(run)
    return max((r["step"] for r in rows if "loss" in r), default=0)


def resume_step(run: Path) -> int:
    """The step the next launch continues from: its stage's latest checkpoint, or where the
    search ended (RUN/pruned) when the efficient stage has none yet."""
    latest = read_json(run / "checkpoints" / "latest.json")
    pruned = read_json(run / "pruned" / "trainer_state.json")
    if pruned is not None and (latest is None or latest.get("phase") != "efficient"):
        return pruned["state"]["step"]
    return latest["step"] if latest else 0


def in_flight(run: Path) -> list[str]:
    """The writes under way (or cut short) in RUN: checkpoints not yet published, the temporaries
    and set-aside copies of RUN/pruned and RUN/final."""
    found = [f"checkpoints/{p.name}" for p in (run / "checkpoints").glob("tmp-*")]
    found += [p.name for p in run.glob("*.tmp")] + [p.name for p in run.glob("*.old")]
    return sorted(found)


def identity(path: Path) -> tuple[int, int] | None:
    """A directory's inode and ctime: a new one, or one written into, has changed."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_ctime_ns


# ------------------------------------------------------------------ one launch of pretrain.sh

class Launch:
    """`bash slurm/pretrain.sh ...` in a session of its own (its process group is the session's),
    stdout and stderr in files."""

    def __init__(self, cmd: list[str], env: dict, logs: Path):
        self.logs = logs
        self.extensions = Path(env["TORCH_EXTENSIONS_DIR"])
        self.hangs: list[str] = []  # what this launch was found waiting for, and freed from
        self.checked = 0.0
        with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        self.t0 = time.monotonic()
        self.monitor_killed = False

    def running(self) -> bool:
        return self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def processes(self, module: str) -> list[psutil.Process]:
        """The session's processes running `python -m MODULE` (a trainer's forked data loader
        worker included: it has the trainer's command line)."""
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        found = []
        for p in procs:
            try:
                if module in p.cmdline():
                    found.append(p)
            except psutil.Error:
                continue
        return found

    def kill_group(self) -> bool:
        if not self.running():
            return False
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True

    def kill(self, module: str) -> set[int]:
        """SIGKILL to every process of the session running MODULE; their pids."""
        pids = set()
        for p in self.processes(module):
            try:
                p.kill()
                pids.add(p.pid)
            except psutil.Error:
                continue
        return pids

    def unstick(self) -> None:
        """Every few seconds: a stale build lock (see STALE_LOCK_S) is recorded and removed, so
        that the launch waiting for it goes on."""
        if time.monotonic() - self.checked < 5.0:
            return
        self.checked = time.monotonic()
        for lock in stale_locks(self.extensions):
            lock.unlink(missing_ok=True)
            self.hangs.append(f"waited {STALE_LOCK_S}+ s for {lock}, left by a killed launch (removed)")

    def wait(self) -> int:
        while self.running() and self.elapsed() < LAUNCH_TIMEOUT_S:
            self.unstick()
            time.sleep(0.1)
        if self.running():
            self.kill_group()
            self.proc.wait()
            self.hangs.append(f"still running after {LAUNCH_TIMEOUT_S} s: killed")
            return -999
        return self.proc.returncode

    def session(self) -> list[psutil.Process]:
        """The session's live processes (a killed one is a zombie until its new parent reaps it)."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == self.proc.pid:
                    found.append(p)
            except (OSError, psutil.Error):
                continue
        return found

    def strays(self) -> list[str]:
        """After the shell exited: processes of its session still alive a second later (each is
        killed)."""
        deadline = time.monotonic() + 1.0
        while (left := self.session()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                continue
        return [f"{p.pid} {' '.join(p.info['cmdline'] or [])[:120]}" for p in left]

    def stderr(self) -> str:
        return Path(f"{self.logs}.err").read_text(errors="replace")


def wait_until(launch: Launch, ready) -> bool:
    """Polls until ready() or the launch exits (or is stuck); whether ready() came first."""
    while launch.running() and launch.elapsed() < LAUNCH_TIMEOUT_S:
        if ready():
            return True
        launch.unstick()
        time.sleep(POLL_S)
    return False


# ------------------------------------------------------------------ the reference

@dataclass
class Reference:
    """The unbroken run and its timeline, seconds from the start: when each step's row appeared,
    when the ticket did, when the run ended; and how long each kind of write was visible."""
    run: Path
    wall_s: float
    step_at: dict[int, float]
    ticket_at: float
    ticket_step: int
    writes_ms: dict[str, list[float]]

    def startup(self) -> float:
        """Seconds from a launch to its first step: the shorter of the reference's two launches
        (the first one alone once waited two minutes for DeepSpeed's JIT-built op, locked by
        another process)."""
        relaunch = self.step_at.get(self.ticket_step + 1, self.wall_s) - self.step_at.get(self.ticket_step, 0.0)
        return min(self.step_at[1], relaunch)

    def left_after(self, step: int) -> float:
        """Seconds a launch that continues from STEP takes: its start-up, then the reference's
        time from that step (or its first) to the end."""
        return self.startup() + self.wall_s - self.step_at.get(max(step, 1), self.wall_s)

    def to_json(self) -> dict:
        return {"run": str(self.run), "wall_s": self.wall_s, "step_at": self.step_at, "ticket_at": self.ticket_at,
                "ticket_step": self.ticket_step, "writes_ms": self.writes_ms}

    @classmethod
    def from_json(cls, d: dict) -> "Reference":
        return cls(Path(d["run"]), d["wall_s"], {int(k): v for k, v in d["step_at"].items()}, d["ticket_at"],
                   d["ticket_step"], d["writes_ms"])


def write_kind(name: str) -> str:
    return "checkpoint" if name.startswith("checkpoints/") else name.split(".")[0]


def reference_run(setup: Setup, reuse: bool = False) -> Reference:
    """The unbroken run in WORKDIR/reference, watched every 5 ms for its timeline. reuse: keep a
    finished one made with the same command."""
    run, record = setup.workdir / "reference", setup.workdir / "reference.json"
    saved = read_json(record)
    if reuse and saved and saved.get("command") == setup.command(run) and (run / "finished.json").exists():
        return Reference.from_json(saved["reference"])
    shutil.rmtree(run, ignore_errors=True)
    launch = Launch(setup.command(run), setup.env(), setup.workdir / "reference-launch")
    step_at, ticket_at, seen, writes = {}, None, 0, {}
    open_writes: dict[str, float] = {}
    metrics = run / "metrics.jsonl"
    size = -1
    while launch.running():
        now = launch.elapsed()
        if metrics.exists() and metrics.stat().st_size != size:  # read only when it grew
            size = metrics.stat().st_size
            for step in range(seen + 1, last_step(run) + 1):
                step_at[step] = now
            seen = max(seen, last_step(run))
        if ticket_at is None and (run / "ticket.json").exists():
            ticket_at = now
        flying = set(in_flight(run))
        for name in flying - open_writes.keys():
            open_writes[name] = now
        for name in set(open_writes) - flying:
            writes.setdefault(write_kind(name), []).append(round(1000 * (now - open_writes.pop(name)), 1))
        launch.unstick()
        time.sleep(POLL_S)
    rc = launch.wait()
    if launch.hangs:  # its timeline would mislead every timed kill
        raise SystemExit(f"the reference run hung: {launch.hangs}; run again")
    if rc != 0:
        raise SystemExit(f"the reference run exited {rc}:\n{launch.stderr()[-3000:]}")
    ticket = read_json(run / "ticket.json")
    ref = Reference(run, launch.elapsed(), step_at, ticket_at or 0.0, ticket["step"], writes)
    problems = structure(run, setup)
    if len(step_at) != setup.flags["max_steps"] or problems:
        raise SystemExit(f"the reference run is not usable: steps seen {sorted(step_at)[:5]}..., {problems}")
    record.write_text(json.dumps({"command": setup.command(run), "reference": ref.to_json()}, indent=2) + "\n")
    return ref


# ------------------------------------------------------------------ kills

@dataclass
class Kill:
    """A planned kill: its kind; u in [0, 1), where in its window it falls (the moment within what
    is left of the launch for group and trainer kills, which of the snapshots or checkpoints
    still ahead for monitor and checkpoint kills); for the others, delay in [0, 1): how far into
    the write the kill falls once it is seen, a fraction of the reference's median time for that
    write (the monitor: of its poll interval). step: a group or trainer kill as the launch logs
    this step (or a later one) instead of at a moment (a test's kill after start-up)."""
    kind: str
    u: float = 0.0
    delay: float = 0.0
    step: int | None = None


def eligible(run: Path, setup: Setup, ref: Reference, launch: Launch, at_start: int) -> list[str]:
    """The kinds that can still land in this launch."""
    stage = RunDir(run).stage()
    if stage == "done":  # the launch says "nothing to do" and prints the summary
        return ["group", "trainer"]
    kinds = ["group", "trainer", "export"]
    searching = stage in ("new", "search") and not (run / "ticket.json").exists()
    if searching and snapshots_ahead(setup, ref, at_start) and not launch.monitor_killed:
        kinds.append("monitor")
    if stage in ("new", "search"):
        kinds.append("prune")
    if any(s > at_start for s in setup.checkpoint_steps(ref.ticket_step)):
        kinds.append("checkpoint")
    return sorted(kinds, key=KINDS.index)


def snapshots_ahead(setup: Setup, ref: Reference, at_start: int) -> list[int]:
    """The gate snapshots a launch continuing from AT_START writes before the ticket's."""
    every = setup.flags["snapshot_every"]
    return [s for s in range(every, ref.ticket_step, every) if s > at_start]


def draw_kill(rng: random.Random, kinds: list[str]) -> Kill:
    # The same three draws whatever the kind, so one trial's later kills do not depend on it.
    kind, u, delay = rng.choice(kinds), rng.random(), rng.random()
    return Kill(kind, u, delay)


def event_delay(kill: Kill, ref: Reference) -> float:
    """Seconds from an event seen to its kill: within the write (tens of milliseconds here, so a
    fixed delay would mostly land after it), or within the monitor's look at the snapshot."""
    if kill.kind == "monitor":
        return kill.delay * MONITOR_POLL_S
    seen = ref.writes_ms.get({"checkpoint": "checkpoint", "prune": "pruned", "export": "final"}[kill.kind])
    return kill.delay * (statistics.median(seen) if seen else 20.0) / 1000


def execute(kill: Kill, launch: Launch, run: Path, setup: Setup, ref: Reference, at_start: int) -> dict:
    """Waits for the kill's moment or event in this launch, then kills. at_start: the step this
    launch continued from. Returns the record: landed (false: the launch ended first), the stage
    RUN was in, the step last logged, the writes left in flight, what was killed."""
    rec = {"kind": kill.kind, "u": round(kill.u, 4), "landed": False}
    if kill.kind in ("group", "trainer") and kill.step is not None:
        rec["target_step"] = kill.step
        wait_until(launch, lambda: last_step(run) >= kill.step)
    elif kill.kind in ("group", "trainer"):
        now = launch.elapsed()
        deadline = now + kill.u * max(0.0, ref.left_after(at_start) - now)
        rec["planned_s"] = round(deadline, 3)
        wait_until(launch, lambda: launch.elapsed() >= deadline)
        if kill.kind == "trainer":  # between launches: the next trainer process
            wait_until(launch, lambda: launch.processes("pipeline.train"))
    elif kill.kind == "monitor":
        # While it watches: as a seeded snapshot before the ticket's is written (the moment the
        # monitor reads it). Not by the clock: the monitor exits at the ticket, and a loaded
        # machine moves that moment by seconds.
        ahead = snapshots_ahead(setup, ref, at_start)
        target = ahead[int(kill.u * len(ahead))] if ahead else setup.flags["max_steps"] + 1  # none: missed
        rec["target_step"] = target
        snapshot = run / "gates" / f"step-{target:07d}.npz"
        before = identity(snapshot)  # one of a discarded trajectory is deleted first: not the event
        if wait_until(launch, lambda: identity(snapshot) not in (None, before)):
            time.sleep(event_delay(kill, ref))
    elif kill.kind == "checkpoint":
        ahead = [s for s in setup.checkpoint_steps(ref.ticket_step) if s > at_start]
        target = ahead[int(kill.u * len(ahead))] if ahead else setup.flags["max_steps"] + 1  # none: missed
        rec["target_step"] = target
        before = {p.name: identity(p) for p in (run / "checkpoints").glob("tmp-*")}

        def writing() -> bool:  # a checkpoint of the target step or later being written now
            for p in (run / "checkpoints").glob("tmp-step-*"):
                try:
                    if int(p.name.split("-")[-1]) >= target and identity(p) not in (None, before.get(p.name)):
                        return True
                except ValueError:
                    continue
            return False
        if wait_until(launch, writing):
            time.sleep(event_delay(kill, ref))
    else:  # prune, export: RUN/pruned or RUN/final, their temporary or set-aside copy (created,
        # or removed: a rewrite first clears what a killed one left)
        name = "pruned" if kill.kind == "prune" else "final"
        paths = [run / f"{name}{suffix}" for suffix in ("", ".tmp", ".old")]
        before = {p: identity(p) for p in paths}
        if wait_until(launch, lambda: any(identity(p) != before[p] for p in paths)):
            time.sleep(event_delay(kill, ref))
    if not launch.running():
        return rec
    rec["at_s"] = round(launch.elapsed(), 3)
    rec["stage"] = RunDir(run).stage()
    if kill.kind == "trainer":
        pids = launch.kill("pipeline.train")
        rec["killed"] = len(pids)
        # pretrain.sh relaunches (the ticket was written) or stops after its summary: the next
        # kill belongs to whichever launch comes next, not to this one's last seconds
        wait_until(launch, lambda: any(p.pid not in pids for p in launch.processes("pipeline.train")))
    elif kill.kind == "monitor":
        rec["killed"] = len(launch.kill("pipeline.monitor"))
        launch.monitor_killed = True  # pretrain.sh starts it once per run of the script
    else:
        rec["killed"] = int(launch.kill_group())
    rec["landed"] = rec["killed"] > 0
    if kill.kind not in ("trainer", "monitor"):
        launch.proc.wait()  # the session is gone: RUN as the kill left it
    rec["step"] = last_step(run)
    if kill.kind != "monitor":  # the writes the kill cut short (the monitor's are atomic)
        rec["in_flight"] = in_flight(run)
    return rec


# ------------------------------------------------------------------ comparing with the reference

def structure(run: Path, setup: Setup) -> list[str]:
    """What any finished run must show on its own: finished.json at the last step, every training
    step logged once, each validation once, no row cut short."""
    out = []
    last = setup.flags["max_steps"]
    done = read_json(run / "finished.json")
    if done is None or done.get("step") != last:
        out.append(f"finished.json: {done}")
    rows, bad = read_metrics(run)
    if bad:
        out.append(f"metrics.jsonl: {bad} unreadable line(s)")
    out += step_list("training rows", [r["step"] for r in rows if "loss" in r], list(range(1, last + 1)))
    out += step_list("validation rows", [r["step"] for r in rows if "val_loss" in r], setup.val_steps())
    return out


def step_list(what: str, got: list[int], want: list[int]) -> list[str]:
    if got == want:
        return []
    missing = sorted(set(want) - set(got))
    twice = sorted(s for s in set(got) if got.count(s) > 1)
    extra = sorted(set(got) - set(want))
    parts = [f"missing {missing}" if missing else "", f"more than once {twice}" if twice else "",
             f"unexpected {extra}" if extra else ""]
    return [f"{what}: " + (", ".join(p for p in parts if p) or f"out of order {got}")]


def short(x) -> str:
    s = json.dumps(x)
    return s if len(s) <= 80 else s[:77] + "..."


def tensors_differ(mine: Path, theirs: Path) -> list[str]:
    """Tensor by tensor, by name: dtype, shape and bytes."""
    try:
        a, b = load_file(str(mine)), load_file(str(theirs))
    except Exception as e:  # a missing or unreadable file
        return [f"{mine.parent.name}/{mine.name}: {type(e).__name__}: {e}"]
    out = []
    if a.keys() != b.keys():
        out.append(f"{mine.parent.name}: tensors {sorted(a.keys() ^ b.keys())} in one run only")
    for k in sorted(a.keys() & b.keys()):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            out.append(f"{mine.parent.name}/{k}: differs (max |diff| "
                       f"{abs(x.astype('float64') - y.astype('float64')).max() if x.shape == y.shape else 'shape'})")
    return out


def compare(run: Path, ref: Path, setup: Setup) -> list[str]:
    """Everything in which a finished trial differs from the reference (empty: identical)."""
    out = structure(run, setup)
    mine, theirs = read_json(run / "ticket.json"), read_json(ref / "ticket.json")
    if mine is None:
        out.append("ticket.json: missing or unreadable")
    else:
        out += [f"ticket.json {k}: {short(mine.get(k))} != {short(theirs[k])}"
                for k in ("step", "heads", "ffn") if mine.get(k) != theirs[k]]
    mine, theirs = read_json(run / "pruned" / "trainer_state.json"), read_json(ref / "pruned" / "trainer_state.json")
    if mine is None:
        out.append("pruned/trainer_state.json: missing or unreadable")
    else:
        for k in ("ticket_step", "heads", "ffn"):
            if mine.get(k) != theirs[k]:
                out.append(f"pruned/trainer_state.json {k}: {short(mine.get(k))} != {short(theirs[k])}")
        for k in ("step", "consumed", "tokens"):  # elapsed is a time
            if mine["state"].get(k) != theirs["state"][k]:
                out.append(f"pruned/trainer_state.json state.{k}: {mine['state'].get(k)} != {theirs['state'][k]}")
    rows, ref_rows = read_metrics(run)[0], read_metrics(ref)[0]
    for kind, fields in (("loss", STEP_FIELDS), ("val_loss", VAL_FIELDS)):
        theirs = {r["step"]: r for r in ref_rows if kind in r}
        for r in (r for r in rows if kind in r and r["step"] in theirs):
            bad = [f"{f} {r.get(f)!r} != {theirs[r['step']].get(f)!r}" for f in fields
                   if r.get(f) != theirs[r["step"]].get(f)]
            if bad:
                out.append(f"metrics step {r['step']} ({kind}): {'; '.join(bad)}")
                break  # the first step that differs says enough
    for part in ("pruned", "final"):
        out += tensors_differ(run / part / "model.safetensors", ref / part / "model.safetensors")
        if read_json(run / part / "config.json") != read_json(ref / part / "config.json"):
            out.append(f"{part}/config.json differs")
    mine, theirs = read_json(run / "summary.json") or {}, read_json(ref / "summary.json") or {}
    out += [f"summary.json {k}: {short(mine.get(k))} != {short(theirs.get(k))}"
            for k in SUMMARY_FIELDS if mine.get(k) != theirs.get(k)]
    return out


# ------------------------------------------------------------------ one trial

def trial_seed(seed: int, trial: int) -> int:
    return seed * 1_000_003 + trial


def run_trial(setup: Setup, ref: Reference, trial: int, seed: int, plan: list[Kill] | None = None) -> dict:
    """Trial TRIAL: a fresh RUN, 1-3 kills (PLAN, or drawn from the trial's seeded RNG), reruns
    until the command exits 0, then the comparison with the reference."""
    rng = random.Random(trial_seed(seed, trial))
    n_kills = len(plan) if plan is not None else rng.randint(1, 3)
    tdir = setup.workdir / "trials" / f"{trial:03d}"
    shutil.rmtree(tdir, ignore_errors=True)
    tdir.mkdir(parents=True)
    run = tdir / "run"
    kills, launches, lost = [], [], []
    t0 = time.monotonic()
    finished = False
    while len(launches) < setup.max_launches:
        at_start = resume_step(run)
        launch = Launch(setup.command(run), setup.env(), tdir / f"launch-{len(launches) + 1}")
        landed = False
        while len(kills) < n_kills and launch.running():
            if plan is not None:
                kill = plan[len(kills)]
            else:
                kill = draw_kill(rng, eligible(run, setup, ref, launch, at_start))
            rec = {"launch": len(launches) + 1, **execute(kill, launch, run, setup, ref, at_start)}
            kills.append(rec)
            landed |= rec["landed"]
        rc = launch.wait()
        err = launch.stderr()
        launches.append({"rc": rc, "killed": landed, "wall_s": round(launch.elapsed(), 2)})
        where = f"launch {len(launches)}"
        if rc not in (EXIT_AFTER_KILL if landed else {0}):
            lost.append(f"{where} exited {rc}{' after a kill' if landed else ' without a kill'}: "
                        f"{err.strip().splitlines()[-1][:200] if err.strip() else ''}")
        if "Traceback (most recent call last)" in err:
            tail = err[err.index("Traceback (most recent call last)"):].strip().splitlines()
            lost.append(f"{where}: a traceback ({tail[-1][:200]})")
        latest = read_json(run / "checkpoints" / "latest.json")
        if latest is not None and not (run / "checkpoints" / latest["tag"]).is_dir():
            lost.append(f"{where}: latest.json names {latest['tag']}, which is missing")
        lost += [f"{where}: {h}" for h in launch.hangs]  # a rerun that could not continue by itself
        if strays := launch.strays():
            launches[-1]["strays"] = strays
        if rc == 0:
            finished = True
            break
    if not finished:
        lost.append(f"not finished after {len(launches)} launches")
    differences = compare(run, ref.run, setup) if finished else []
    leftovers = in_flight(run)  # temporaries a finished run still holds (noticed, not counted)
    if finished and not differences and not lost and not setup.keep:
        shutil.rmtree(run, ignore_errors=True)
    return {"trial": trial, "seed": trial_seed(seed, trial), "kills": kills, "launches": launches,
            "finished": finished, "identical": finished and not differences, "differences": differences,
            "lost": lost, "leftovers": leftovers, "reruns": len(launches) - 1,
            "wall_s": round(time.monotonic() - t0, 2), "run_dir": str(run) if run.exists() else None}


# ------------------------------------------------------------------ the report

def table(trials: list[dict], ref: Reference, setup: Setup, seed: int) -> str:
    landed = [k for t in trials for k in t["kills"] if k["landed"]]
    missed = sum(not k["landed"] for t in trials for k in t["kills"])
    by_stage = {s: sum(k["stage"] == s for k in landed) for s in STAGES}
    writes = ", ".join(f"{k} {statistics.median(v):.0f} ms ({len(v)})" for k, v in sorted(ref.writes_ms.items()))
    lines = [f"chaos: {len(trials)} trials (seed {seed}), {setup.flags['model']} {setup.flags['max_steps']} steps "
             f"(ticket at step {ref.ticket_step}), unbroken run {ref.wall_s:.1f} s (a launch's start-up "
             f"{ref.startup():.1f} s); writes seen in it: {writes}",
             "",
             "| trials | kills landed (missed) | kill points by stage | runs finished | runs identical "
             "| anything lost | median reruns | wall time |",
             "|---|---|---|---|---|---|---|---|",
             f"| {len(trials)} | {len(landed)} ({missed}) | "
             + ", ".join(f"{s} {n}" for s, n in by_stage.items())
             + f" | {sum(t['finished'] for t in trials)} | {sum(t['identical'] for t in trials)} "
             f"| {sum(bool(t['lost']) for t in trials)} | "
             f"{statistics.median(t['reruns'] for t in trials) if trials else 0:g} | "
             f"{sum(t['wall_s'] for t in trials) / 60:.1f} min |",
             "",
             "| kill | " + " | ".join(STAGES) + " | landed | missed | a write in flight |",
             "|---|" + "---|" * (len(STAGES) + 3)]
    for kind in KINDS:
        mine = [k for t in trials for k in t["kills"] if k["kind"] == kind]
        hit = [k for k in mine if k["landed"]]
        lines.append(f"| {kind} | " + " | ".join(str(sum(k["stage"] == s for k in hit)) for s in STAGES)
                     + f" | {len(hit)} | {len(mine) - len(hit)} | {sum(bool(k.get('in_flight')) for k in hit)} |")
    bad = [t for t in trials if not t["identical"] or t["lost"]]
    if bad:
        lines += ["", "Failures:"]
        for t in bad:
            kills = ", ".join(f"{k['kind']}@{k.get('stage', 'missed')}" + (f" step {k['step']}" if k["landed"] else "")
                              for k in t["kills"])
            lines.append(f"  trial {t['trial']} (seed {t['seed']}; kills {kills}; exits "
                         f"{[x['rc'] for x in t['launches']]}; RUN {t['run_dir']}):")
            lines += [f"    lost: {x}" for x in t["lost"]] + [f"    differs: {x}" for x in t["differences"][:10]]
    strays = sum(bool(x.get("strays")) for t in trials for x in t["launches"])
    leftovers = sum(bool(t["leftovers"]) for t in trials)
    if strays or leftovers:
        lines += ["", f"Noticed: {strays} launch(es) left processes behind; {leftovers} finished RUN(s) kept "
                      "temporaries (see the JSON)."]
    return "\n".join(lines)


def code_version() -> dict:
    """The commit the pipeline ran from and the files that differ from it (a benchmark of one
    state of the code)."""
    def git(*args) -> str | None:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    changed = git("status", "--porcelain", "--", "pipeline", "data_prep", "slurm", "bench/chaos.py")
    return {"root": str(ROOT), "commit": git("rev-parse", "HEAD"),
            "changed": changed.splitlines() if changed else []}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="trial i's RNG is seeded with seed * 1000003 + i")
    p.add_argument("--data", type=Path, help="a data_prep output (default: built into --workdir)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "chaos.json")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "chaos")
    p.add_argument("--keep", action="store_true", help="keep every trial's RUN (default: only failures')")
    p.add_argument("--jobs", type=int, default=1, help="trials at once (each is one CPU process)")
    p.add_argument("--max_launches", type=int, default=10, help="launches of a trial before it counts as not finished")
    p.add_argument("--resume", action="store_true",
                   help="keep the trials already in --out (same seed and flags) and the reference; run the rest")
    a = p.parse_args()
    setup = Setup.make(a.workdir, a.data, max_launches=a.max_launches, keep=a.keep)
    done: dict[int, dict] = {}
    old = read_json(a.out) if a.resume else None
    if old and old.get("seed") == a.seed and old.get("flags") == setup.flags:
        done = {t["trial"]: t for t in old["trials"] if t["trial"] < a.trials}
    ref = reference_run(setup, reuse=a.resume)
    print(f"reference: {ref.wall_s:.1f} s (start-up {ref.startup():.1f} s), ticket at step {ref.ticket_step}; "
          f"{len(done)} trial(s) kept, "
          f"{a.trials - len(done)} to run", flush=True)
    lock = threading.Lock()
    code = code_version()

    def save() -> None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        trials = [done[i] for i in sorted(done)]
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(json.dumps({"seed": a.seed, "flags": setup.flags, "code": code, "reference": ref.to_json(),
                                   "command": setup.command(Path("RUN")), "trials": trials}, indent=2) + "\n")
        tmp.replace(a.out)

    def one(i: int) -> None:
        t = run_trial(setup, ref, i, a.seed)
        with lock:
            done[i] = t
            save()
            kills = ", ".join(f"{k['kind']}@{k.get('stage', 'missed')}" for k in t["kills"])
            verdict = ("identical" if t["identical"] else "DIFFERS") if t["finished"] else "NOT FINISHED"
            print(f"trial {i:3d}: {kills}; exits {[x['rc'] for x in t['launches']]}; {verdict}"
                  f"{'; LOST ' + str(t['lost']) if t['lost'] else ''}; {t['wall_s']:.0f} s", flush=True)

    todo = [i for i in range(a.trials) if i not in done]
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        list(pool.map(one, todo))
    save()
    print()
    print(table([done[i] for i in sorted(done)], ref, setup, a.seed))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
