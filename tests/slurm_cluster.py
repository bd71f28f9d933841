"""A real Slurm cluster for the tests, started (and stopped) by the tests themselves.

``SlurmCluster(state_dir)`` installs Slurm when ``sbatch`` is missing and starts munged when no
munge daemon answers (see slurm_install.py), writes a one-node ``slurm.conf`` for this machine
(its CPU count and ~90% of its memory) under ``state_dir``, starts slurmctld and slurmd with that
conf, and waits for the node to be idle. ``stop()`` cancels every job and stops only the daemons
it started. All Slurm state (conf, spool, state save, logs, pid files) lies under ``state_dir``.

Client commands find the cluster through ``SLURM_CONF``: pass ``cluster.env`` to subprocesses.
The daemons listen on free ports picked at start, so a stale or system cluster does not clash.

No cgroups are needed (proctrack/linuxproc, task/none, jobacct_gather/none), so this works in
containers and sandboxes (gVisor, Firecracker) as well. No accounting (no slurmdbd, no sacct):
``wait()`` polls ``scontrol show job``; finished jobs stay visible there for MinJobAge=300 s.

The class is written for ``self.nodes`` (here one, this host, at 127.0.0.1): slurm_netns.py's
``NetnsSlurmCluster`` subclasses it with two nodes, each slurmd in its own network namespace.

Self-check: ``python tests/slurm_selfcheck.py`` (one node), ``python tests/slurm_selfcheck.py
--two-nodes`` (two nodes in network namespaces, with a torch.distributed gloo all_reduce).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from slurm_install import install_slurm, run, start_munge, stop_munge, tail

# States after which a job neither runs nor is queued any more (a requeued job goes back to PENDING).
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


class JobResult(str):
    """The final JobState (a str, e.g. ``"COMPLETED"``), with ``exit_code`` ("0:0", Slurm's
    ``ExitCode``: exit status ':' signal) and ``info`` (every ``scontrol show job`` field; empty
    when the job had already left slurmctld, then the state is ``"GONE"``)."""

    exit_code: str
    info: dict

    def __new__(cls, state: str, exit_code: str = "", info: dict | None = None):
        obj = super().__new__(cls, state)
        obj.exit_code = exit_code
        obj.info = info or {}
        return obj

    @property
    def returncode(self) -> int | None:
        """The batch script's exit status (the part of ExitCode before ':'), None if unknown."""
        try:
            return int(self.exit_code.split(":")[0])
        except ValueError:
            return None


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def mem_total_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_show(line: str) -> dict:
    """``scontrol show ... -o`` output (Key=Value Key=Value ...) as a dict. Values may hold
    spaces (Command=, Reason=), so split before each ' Key=' rather than on whitespace."""
    fields = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)",
                         line.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields



class SlurmCluster:
    """A one-node Slurm cluster (partition ``debug``) with all its state under ``state_dir``.

    ``with SlurmCluster(tmp) as c: job = c.sbatch(["--wrap", "hostname"], cwd=tmp); c.wait(job)``
    """

    def __init__(self, state_dir: str | os.PathLike | None = None, start_timeout: float = 60.0,
                 cred_expire: int = 10):
        self._own_tmp = None
        if state_dir is None:
            self._own_tmp = tempfile.mkdtemp(prefix="slurm-")
            state_dir = self._own_tmp
        self.dir = Path(state_dir).resolve()
        self.start_timeout = start_timeout
        # Step credential lifetime; also how long a requeued job waits before it may start again
        # (Slurm's default, 120 s, makes every requeue test take over two minutes).
        self.cred_expire = cred_expire
        self.conf = self.dir / "slurm.conf"
        self.log_dir = self.dir / "log"
        self.node = short_hostname()
        self.nodes = [self.node]
        self.node_addr = {self.node: "127.0.0.1"}   # NodeAddr of each node
        self.ctld_addr = "127.0.0.1"                # where slurmctld listens
        self.cpus = os.cpu_count() or 1             # per node
        self.real_memory = max(1, int(mem_total_mib() * 0.9))
        self.ctld_port = self.slurmd_port = None
        self._procs: dict[str, subprocess.Popen] = {}   # daemons we started
        self._munged_pid: int | None = None              # munged, when we started it
        self.started = False

    # ---- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def env(self) -> dict:
        """os.environ plus SLURM_CONF pointing at this cluster (and no SLURM_* job variables of an
        outer job, which would confuse sbatch/srun)."""
        e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_",
                                                                      "SALLOC_", "SQUEUE_"))}
        e["SLURM_CONF"] = str(self.conf)
        return e

    def start(self) -> "SlurmCluster":
        if self.started:
            return self
        t0 = time.monotonic()
        install_slurm()
        for d in ("log", "ctld_state", "run", *(f"slurmd_spool/{n}" for n in self.nodes)):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        self.conf.write_text(self.slurm_conf())
        try:
            self._prepare()
            self._munged_pid = start_munge()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn_slurmds()
            self._wait_idle(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.started = True
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Cancel every job, then stop what start() started (slurmd, slurmctld, munged)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                run(["scancel", "--full", "--user", str(os.getuid())], env=self.env, timeout=30)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.squeue():
                    time.sleep(0.5)
        # Every slurmd first ("slurmd-NODE"), slurmctld last.
        for name in [n for n in list(self._procs) if n != "slurmctld"] + ["slurmctld"]:
            p = self._procs.pop(name, None)
            if p is not None:
                self._terminate(p)
        if self._munged_pid is not None:
            stop_munge(self._munged_pid)
            self._munged_pid = None
        self.started = False
        if self._own_tmp:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
            self._own_tmp = None

    # ---- jobs -----------------------------------------------------------------------------------

    def cmd(self, args: list[str], check: bool = True, timeout: float = 60, **kw):
        """Run a Slurm client command (["scontrol", "show", "node"]) against this cluster."""
        r = run(list(map(str, args)), env=kw.pop("env", self.env), timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, args))} failed ({r.returncode}):\n"
                               f"{r.stdout}{r.stderr}")
        return r

    def sbatch(self, args: list[str], cwd: str | os.PathLike | None = None) -> str:
        """Submit (``sbatch --parsable ARGS``, from ``cwd``, default the cluster's state dir, where
        the default slurm-%j.out then goes) and return the job id."""
        r = self.cmd(["sbatch", "--parsable", *args], cwd=self.dir if cwd is None else cwd)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict | None:
        """``scontrol show job -o ID`` as a dict; None when slurmctld no longer knows the job.
        (For an array/het job the first record.)"""
        r = self.cmd(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            if "Invalid job id" in r.stderr or "Invalid job id" in r.stdout:
                return None
            if r.returncode != 0:
                raise RuntimeError(f"scontrol show job {job_id} failed: {r.stdout}{r.stderr}")
            return None
        return parse_show(r.stdout.strip().splitlines()[0])

    def state(self, job_id: str) -> str | None:
        info = self.job_info(job_id)
        return None if info is None else info.get("JobState")

    def wait(self, job_id: str, timeout: float = 300, poll: float = 0.5) -> JobResult:
        """Wait until the job has finished; its final JobState (a JobResult: a str with
        ``exit_code`` and ``info``). "GONE" when the job left slurmctld (MinJobAge) unseen."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info is None:
                return JobResult("GONE")
            state = info.get("JobState", "")
            if state in TERMINAL_STATES:
                return JobResult(state, info.get("ExitCode", ""), info)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s: {info}")
            time.sleep(poll)

    def wait_state(self, job_id: str, states, timeout: float = 60, poll: float = 0.2) -> dict:
        """Wait until the job's JobState is one of ``states``; its scontrol fields."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info is not None and info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout} s: {info}")

    def requeue(self, job_id: str) -> None:
        """``scontrol requeue ID`` (the job must have been submitted with --requeue, or
        JobRequeue=1, which this cluster sets)."""
        self.cmd(["scontrol", "requeue", str(job_id)])

    def cancel(self, job_id: str, signal_name: str | None = None) -> None:
        args = ["scancel", str(job_id)] if signal_name is None else \
            ["scancel", "--full", f"--signal={signal_name}", str(job_id)]
        self.cmd(args)

    def squeue(self) -> list[str]:
        """Ids of the jobs pending or running."""
        r = self.cmd(["squeue", "-h", "-o", "%i"], check=False)
        return r.stdout.split()

    # ---- internals ------------------------------------------------------------------------------


    def slurm_conf(self) -> str:
        d = self.dir
        nodes = "\n".join(f"NodeName={n} NodeAddr={a} CPUs={self.cpus} RealMemory={self.real_memory} "
                          "State=UNKNOWN" for n, a in self.node_addr.items())
        return f"""\
# Test cluster ({len(self.nodes)} node(s)) written by tests/slurm_cluster.py
ClusterName=testcluster
SlurmctldHost={short_hostname()}({self.ctld_addr})
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={d}/ctld_state
SlurmdSpoolDir={d}/slurmd_spool/%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _prepare(self) -> None:
        """Hook run by start() before the daemons start (the two-node variant sets up its network
        namespaces here). On failure start() calls stop()."""

    def _slurmd_argv(self, node: str) -> list[str]:
        """The command line of NODE's slurmd (the two-node variant runs it in a namespace)."""
        return ["slurmd", "-D", "-f", str(self.conf), "-N", node]

    def _spawn_slurmds(self) -> None:
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", self._slurmd_argv(n))

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log_dir / f"{name}.out", "ab")
        try:
            self._procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, env=self.env,
                                                 start_new_session=True)
        finally:
            out.close()

    @staticmethod
    def _terminate(p: subprocess.Popen) -> None:
        if p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.kill()
            p.wait(5)

    def _wait_idle(self, deadline: float) -> None:
        states: dict = {}
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while starting\n"
                                       + self.diagnostics())
            r = self.cmd(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=20)
            if r.returncode == 0:
                states = dict(line.split()[:2] for line in r.stdout.splitlines() if line.split())
                if all(states.get(n, "").rstrip("*~#!%$@^-") == "idle" for n in self.nodes):
                    return
                # A node that came up "down"/"drained" from an earlier run: bring it back.
                for n, st in states.items():
                    if st.startswith(("down", "drain")):
                        self.cmd(["scontrol", "update", f"NodeName={n}", "State=RESUME"],
                                 check=False)
            else:
                states = {"sinfo": r.stdout + r.stderr}
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes {self.nodes} not idle after {self.start_timeout} s "
                           f"(sinfo: {states!r})\n" + self.diagnostics())

    def diagnostics(self) -> str:
        parts = [f"--- {self.conf} ---\n" + (self.conf.read_text() if self.conf.exists() else "")]
        names = ["slurmctld.log", "slurmctld.out"]
        for n in self.nodes:
            names += [f"slurmd-{n}.log", f"slurmd-{n}.out"]
        for name in names:
            parts.append(f"--- {self.log_dir / name} (tail) ---\n{tail(self.log_dir / name)}")
        with contextlib.suppress(Exception):
            r = self.cmd(["scontrol", "show", "node"], check=False, timeout=10)
            parts.append(f"--- scontrol show node ---\n{r.stdout}{r.stderr}")
        return "\n".join(parts)
