"""A real one-node Slurm cluster for the tests, started (and stopped) by the tests themselves.

``SlurmCluster(state_dir)`` installs Slurm when ``sbatch`` is missing (Debian packages munge,
slurmctld, slurmd, slurm-client, with apt-get; needs root, as in CI), writes a one-node
``slurm.conf`` for this machine (its CPU count and ~90% of its memory) under ``state_dir``, starts
munged when no munge daemon answers, then slurmctld and slurmd with that conf, and waits for the
node to be idle. ``stop()`` cancels every job and stops only the daemons it started. All Slurm
state (conf, spool, state save, logs, pid files) lies under ``state_dir``; munge keeps its usual
key (``/etc/munge/munge.key``, created when missing) and socket (``/run/munge``).

Client commands find the cluster through ``SLURM_CONF``: pass ``cluster.env`` to subprocesses.
The daemons listen on free ports picked at start, so a stale or system cluster does not clash.

No cgroups are needed (proctrack/linuxproc, task/none, jobacct_gather/none), so this works in
containers and sandboxes (gVisor, Firecracker) as well. No accounting (no slurmdbd, no sacct):
``wait()`` polls ``scontrol show job``; finished jobs stay visible there for MinJobAge=300 s.

``NetnsSlurmCluster(state_dir)`` is a two-node variant (nodes n1, n2, each slurmd in its own
network namespace, 10.77.0.11/12 on a host bridge 10.77.0.1); see its docstring.

Self-check: ``python tests/slurm_cluster.py`` (one node), ``python tests/slurm_cluster.py
--two-nodes`` (two nodes in network namespaces, with a torch.distributed gloo all_reduce).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SLURM_PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "iproute2"]  # ip: the 2-node cluster
# States after which a job neither runs nor is queued any more (a requeued job goes back to PENDING).
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_USER = "munge"


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


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


def parse_show(line: str) -> dict:
    """``scontrol show ... -o`` output (Key=Value Key=Value ...) as a dict. Values may hold
    spaces (Command=, Reason=), so split before each ' Key=' rather than on whitespace."""
    fields = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s+[A-Za-z][A-Za-z0-9_:/]*=|$)",
                         line.strip()):
        fields.setdefault(m.group(1), m.group(2))
    return fields


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def slurm_installed() -> bool:
    return all(shutil.which(c) for c in ("sbatch", "srun", "scontrol", "sinfo", "slurmctld",
                                         "slurmd", "munged", "munge", "unmunge", "ip"))


def install_slurm() -> None:
    """apt-get install the Debian packages (apt-get update first when the install fails)."""
    if slurm_installed():
        return
    if os.geteuid() != 0:
        raise RuntimeError("Slurm is not installed and installing it needs root: apt-get install -y "
                           + " ".join(SLURM_PACKAGES))
    if not shutil.which("apt-get"):
        raise RuntimeError("Slurm is not installed and there is no apt-get to install it")
    # One installer at a time (pytest-xdist workers).
    with open(Path(tempfile.gettempdir()) / "slurm_cluster_install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if slurm_installed():
            return
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES]
        # Keep the packages' maintainer scripts from starting the system services (there is no
        # /etc/slurm/slurm.conf; under systemd a failing start could fail the install): a
        # policy-rc.d that denies every start, for the duration of the install only.
        policy = Path("/usr/sbin/policy-rc.d")
        own_policy = not policy.exists()
        if own_policy:
            policy.write_text("#!/bin/sh\n# tests/slurm_cluster.py: no service starts\nexit 101\n")
            policy.chmod(0o755)
        try:
            r = _run(install, env=env)
            if r.returncode != 0:
                u = _run(["apt-get", "update", "-q"], env=env)
                r = _run(install, env=env)
                if r.returncode != 0:
                    raise RuntimeError(f"apt-get install {' '.join(SLURM_PACKAGES)} failed:\n"
                                       f"{u.stdout[-2000:]}{u.stderr[-2000:]}\n{r.stdout[-3000:]}"
                                       f"{r.stderr[-3000:]}")
        finally:
            if own_policy:
                policy.unlink(missing_ok=True)
        if not slurm_installed():
            raise RuntimeError("apt-get installed the Slurm packages but their commands are missing")


def munge_works() -> bool:
    try:
        m = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if m.returncode != 0:
            return False
        u = subprocess.run(["unmunge"], input=m.stdout, capture_output=True, timeout=10)
        return u.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


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
        self.cpus = os.cpu_count() or 1
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
        for d in ("log", "ctld_state", "slurmd_spool", "run"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        self.conf.write_text(self.slurm_conf())
        try:
            self._prepare()
            self._start_munge()
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
                _run(["scancel", "--full", "--user", str(os.getuid())], env=self.env, timeout=30)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.squeue():
                    time.sleep(0.5)
        # Every slurmd first (one "slurmd", or "slurmd-NODE" per node), slurmctld last.
        for name in [n for n in list(self._procs) if n != "slurmctld"] + ["slurmctld"]:
            p = self._procs.pop(name, None)
            if p is not None:
                self._terminate(p)
        if self._munged_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._munged_pid, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _alive(self._munged_pid):
                    time.sleep(0.1)
            self._munged_pid = None
        self.started = False
        if self._own_tmp:
            shutil.rmtree(self._own_tmp, ignore_errors=True)
            self._own_tmp = None

    # ---- jobs -----------------------------------------------------------------------------------

    def cmd(self, args: list[str], check: bool = True, timeout: float = 60, **kw):
        """Run a Slurm client command (["scontrol", "show", "node"]) against this cluster."""
        r = _run(list(map(str, args)), env=kw.pop("env", self.env), timeout=timeout, **kw)
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
        return f"""\
# One-node test cluster written by tests/slurm_cluster.py
ClusterName=testcluster
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={d}/ctld_state
SlurmdSpoolDir={d}/slurmd_spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
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
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.real_memory} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""

    def _prepare(self) -> None:
        """Hook run by start() before the daemons start (the two-node variant sets up its network
        namespaces here). On failure start() calls stop()."""

    def _spawn_slurmds(self) -> None:
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])

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

    def _start_munge(self) -> None:
        if munge_works():
            return
        if os.geteuid() != 0:
            raise RuntimeError("no munge daemon answers (munge -n | unmunge) and starting one needs root")
        have_user = _user_exists(MUNGE_USER)
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            if shutil.which("mungekey"):
                _run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
            else:
                MUNGE_KEY.write_bytes(os.urandom(1024))
        os.chmod(MUNGE_KEY, 0o400)
        for p in (MUNGE_RUN_DIR, Path("/var/lib/munge"), Path("/var/log/munge")):
            p.mkdir(parents=True, exist_ok=True)
            os.chmod(p, 0o755 if p == MUNGE_RUN_DIR else 0o700)
        os.chmod("/var/lib/munge", 0o711)
        if have_user:
            for p in (MUNGE_KEY.parent, MUNGE_KEY, MUNGE_RUN_DIR, Path("/var/lib/munge"),
                      Path("/var/log/munge")):
                shutil.chown(p, MUNGE_USER, MUNGE_USER)
        # A stale pid file/socket of a dead munged makes the new one refuse to start.
        pid_file = MUNGE_RUN_DIR / "munged.pid"
        for stale in (pid_file, MUNGE_RUN_DIR / "munge.socket.2", MUNGE_RUN_DIR / "munge.socket.2.lock"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        argv = ["munged"] if have_user else ["munged", "--force"]
        if have_user:
            argv = ["setpriv", f"--reuid={MUNGE_USER}", f"--regid={MUNGE_USER}", "--init-groups",
                    *argv] if shutil.which("setpriv") else ["runuser", "-u", MUNGE_USER, "--", *argv]
        r = _run(argv, timeout=30)  # daemonizes; returns once it serves
        deadline = time.monotonic() + 15
        while not munge_works() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not munge_works():
            raise RuntimeError(f"munged did not start ({' '.join(argv)} -> {r.returncode}):\n"
                               f"{r.stdout}{r.stderr}\n{tail(Path('/var/log/munge/munged.log'))}")
        with contextlib.suppress(OSError, ValueError):
            self._munged_pid = int(pid_file.read_text().strip())

    def _wait_idle(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            for name, p in self._procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while starting\n"
                                       + self.diagnostics())
            r = self.cmd(["sinfo", "-h", "-o", "%T"], check=False, timeout=20)
            state = (r.stdout.strip() + r.stderr.strip()) if r.returncode else r.stdout.strip()
            if r.returncode == 0 and state.rstrip("*~#!%$@^-") == "idle":
                return
            # A node that came up "down"/"drained" from an earlier run: bring it back.
            if r.returncode == 0 and state.startswith(("down", "drain")):
                self.cmd(["scontrol", "update", f"NodeName={self.node}", "State=RESUME"], check=False)
            time.sleep(0.5)
        raise RuntimeError(f"Slurm node {self.node} not idle after {self.start_timeout} s "
                           f"(sinfo: {state!r})\n" + self.diagnostics())

    def diagnostics(self) -> str:
        parts = [f"--- {self.conf} ---\n" + (self.conf.read_text() if self.conf.exists() else "")]
        for name in ("slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out"):
            parts.append(f"--- {self.log_dir / name} (tail) ---\n{tail(self.log_dir / name)}")
        with contextlib.suppress(Exception):
            r = self.cmd(["scontrol", "show", "node", self.node], check=False, timeout=10)
            parts.append(f"--- scontrol show node ---\n{r.stdout}{r.stderr}")
        return "\n".join(parts)


# ---- two nodes, each in its own network namespace ---------------------------------------------

NETNS_DIR = Path("/var/run/netns")
NETNS_PREFIX = "slurmtest-"          # namespaces:  slurmtest-<tag>-n1, slurmtest-<tag>-n2
LINK_PREFIX = "slt"                  # links: bridge slt<tag>b, host veth ends slt<tag>v1/v2
NETNS_LOCK = Path(tempfile.gettempdir()) / "slurm_netns_cluster.lock"

# Sends one ICMP echo (raw socket, root) to argv[1]; exit status 0 when the reply came.
# Run as `nsenter --net=NS python -c ICMP_PING ADDR` (the image has no ping(8)).
ICMP_PING = r"""
import os, socket, struct, sys, time
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
dst, ident = sys.argv[1], os.getpid() & 0xffff
pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"slurmtest"
pkt = pkt[:2] + struct.pack("!H", csum(pkt)) + pkt[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP); s.settimeout(1.0)
end = time.monotonic() + 5
while time.monotonic() < end:
    s.sendto(pkt, (dst, 0))
    try:
        while True:
            data, addr = s.recvfrom(2048)
            icmp = data[(data[0] & 15) * 4:]
            if addr[0] == dst and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                sys.exit(0)
    except socket.timeout:
        pass
sys.exit(1)
"""


class NetnsSlurmCluster(SlurmCluster):
    """A two-node Slurm cluster on this one machine, each slurmd in its own network namespace.

    ``NetnsSlurmCluster(state_dir)``: same API as SlurmCluster (start/stop/sbatch/wait/env...),
    nodes ``n1`` and ``n2`` (``self.nodes``; ``self.node`` is ``"n1"``), one CPU and
    ``mem_per_node`` MiB each, partition ``debug`` holding both. Needs root and ``ip``/``nsenter``.

    Network (set up by start(), removed by stop()): a Linux bridge on the host with
    ``10.77.0.1/24``; per node a network namespace joined to it by a veth pair whose namespace end
    is ``eth0`` with ``10.77.0.11/24`` (n1) / ``10.77.0.12/24`` (n2), ``lo`` up, default route
    via 10.77.0.1. slurmctld and munged stay on the host (slurmctld at ``vm(10.77.0.1)``; munge's
    socket is a file, seen from every namespace). Each slurmd runs under
    ``nsenter --net=/var/run/netns/NAME`` (not ``ip netns exec``, which remounts /sys).

    Only the network namespace differs: the hostname (UTS) is still the host's in both, and so are
    the filesystem and /etc/hosts (``vm`` -> 127.0.0.1, i.e. the namespace's own lo there). Use
    ``SLURMD_NODENAME`` / the eth0 address to tell nodes apart, an explicit
    ``MASTER_ADDR=10.77.0.11`` for torch.distributed, and ``GLOO_SOCKET_IFNAME=eth0``.

    The subnet is fixed, so one such cluster at a time on the machine: start() takes an exclusive
    lock (``NETNS_LOCK``) and, holding it, removes whatever a killed earlier run left behind (every
    ``slurmtest-*`` namespace, with the processes still in it, and every ``slt*`` link).
    """

    SUBNET_PREFIX = "10.77.0"
    BRIDGE_ADDR = "10.77.0.1"

    def __init__(self, state_dir: str | os.PathLike | None = None, start_timeout: float = 60.0,
                 cred_expire: int = 10, mem_per_node: int = 8000):
        super().__init__(state_dir, start_timeout, cred_expire)
        import hashlib
        self.tag = hashlib.sha1(f"{self.dir}:{os.getpid()}".encode()).hexdigest()[:6]
        self.nodes = ["n1", "n2"]
        self.node = self.nodes[0]
        self.cpus = 1
        self.real_memory = mem_per_node
        self.node_addr = {n: f"{self.SUBNET_PREFIX}.{11 + i}" for i, n in enumerate(self.nodes)}
        self.netns = {n: f"{NETNS_PREFIX}{self.tag}-{n}" for n in self.nodes}
        self.bridge = f"{LINK_PREFIX}{self.tag}b"
        self.host_veth = {n: f"{LINK_PREFIX}{self.tag}v{i + 1}" for i, n in enumerate(self.nodes)}
        self._lock = None
        self.net_seconds = None

    # ---- network --------------------------------------------------------------------------------

    def netns_path(self, node: str) -> str:
        return str(NETNS_DIR / self.netns[node])

    def in_node(self, node: str, argv: list[str]) -> list[str]:
        """argv run inside that node's network namespace (nsenter --net=...)."""
        return ["nsenter", f"--net={self.netns_path(node)}", *map(str, argv)]

    def ping(self, addr: str, node: str | None = None) -> bool:
        """One ICMP echo to addr, from the host (node None) or from inside that node's namespace."""
        argv = [sys.executable, "-c", ICMP_PING, addr]
        r = _run(self.in_node(node, argv) if node else argv, timeout=30)
        return r.returncode == 0

    def _prepare(self) -> None:
        t0 = time.monotonic()
        for tool in ("ip", "nsenter"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} not found (packages iproute2, util-linux)")
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces need root")
        self._lock = open(NETNS_LOCK, "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"another NetnsSlurmCluster holds {NETNS_LOCK} "
                               f"({self.SUBNET_PREFIX}.0/24 is in use)") from None
        self._lock.seek(0)
        stale_daemons = self._lock.read().split()
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.flush()
        self._remove_stale(stale_daemons)
        busy = _run(["ip", "-o", "addr", "show", "to", f"{self.SUBNET_PREFIX}.0/24"]).stdout.strip()
        if busy:
            raise RuntimeError(f"{self.SUBNET_PREFIX}.0/24 is already used on the host:\n{busy}")

        def ip(*args, ns=None):
            argv = ["ip", *(["-n", ns] if ns else []), *args]
            r = _run(argv, timeout=30)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(argv)} failed: {r.stderr.strip()}")

        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.BRIDGE_ADDR}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, n in enumerate(self.nodes):
            ns, veth, peer = self.netns[n], self.host_veth[n], f"{LINK_PREFIX}{self.tag}p{i + 1}"
            ip("netns", "add", ns)
            ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", peer, "netns", ns)
            ip("link", "set", peer, "name", "eth0", ns=ns)
            ip("addr", "add", f"{self.node_addr[n]}/24", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
            ip("route", "add", "default", "via", self.BRIDGE_ADDR, ns=ns)
            ip("link", "set", veth, "master", self.bridge)
            ip("link", "set", veth, "up")
        # host <-> each node, node <-> node (the bridge may take a moment to forward).
        checks = [(None, a) for a in self.node_addr.values()]
        checks += [(n, self.BRIDGE_ADDR) for n in self.nodes]
        checks += [(a, self.node_addr[b]) for a in self.nodes for b in self.nodes if a != b]
        for src, dst in checks:
            if not self.ping(dst, src):
                raise RuntimeError(f"no ping reply from {dst} (from {src or 'host'})\n"
                                   + _run(["ip", "-br", "addr"]).stdout)
        for n in self.nodes:
            (self.dir / "slurmd_spool" / n).mkdir(parents=True, exist_ok=True)
        self.net_seconds = time.monotonic() - t0

    def _spawn_slurmds(self) -> None:
        for n in self.nodes:
            self._spawn(f"slurmd-{n}",
                        self.in_node(n, ["slurmd", "-D", "-f", self.conf, "-N", n]))
        # The daemons' pids (with their start times) go into the lock file, so that a later run
        # can stop them if this one is killed before stop() (slurmctld runs outside the namespaces).
        if self._lock is not None:
            self._lock.write("".join(f"{p.pid}:{_start_time(p.pid)}\n" for p in self._procs.values()))
            self._lock.flush()

    @staticmethod
    def _kill_netns_pids(ns: str) -> None:
        pids = _run(["ip", "netns", "pids", ns]).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(int(p)) for p in pids if p.isdigit()):
            time.sleep(0.1)

    def _remove_stale(self, daemons: list[str] = ()) -> None:
        """(Lock held.) Stop the daemons (``PID:STARTTIME``) and remove the namespaces and links
        of earlier runs that were not stopped."""
        for entry in daemons:
            pid, _, start = entry.partition(":")
            with contextlib.suppress(ValueError, ProcessLookupError):
                if start and _start_time(int(pid)) == start:   # the same process, not a reused pid
                    os.kill(int(pid), signal.SIGKILL)
        for line in _run(["ip", "netns", "list"]).stdout.splitlines():
            ns = line.split()[0] if line.split() else ""
            if ns.startswith(NETNS_PREFIX):
                self._kill_netns_pids(ns)
                _run(["ip", "netns", "del", ns])
        for link in self._our_links(any_tag=True):
            _run(["ip", "link", "del", link])

    def _our_links(self, any_tag: bool = False) -> list[str]:
        out = _run(["ip", "-o", "link", "show"]).stdout
        names = [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", out, re.M)]
        pre = LINK_PREFIX if any_tag else f"{LINK_PREFIX}{self.tag}"
        return [x for x in names if x.startswith(pre) and (not any_tag or re.fullmatch(
            rf"{LINK_PREFIX}[0-9a-f]{{6}}[bvp]\d*", x))]

    def _teardown_net(self) -> None:
        if self._lock is None:
            return
        for n in self.nodes:
            ns = self.netns[n]
            if (NETNS_DIR / ns).exists():
                self._kill_netns_pids(ns)   # step daemons etc. that outlived slurmd
            _run(["ip", "link", "del", self.host_veth[n]])   # takes eth0 in the namespace along
            _run(["ip", "netns", "del", ns])
        _run(["ip", "link", "del", self.bridge])
        left = self._our_links() + [n for n in self.netns.values() if (NETNS_DIR / n).exists()]
        self._lock.truncate(0)
        self._lock.close()   # releases the flock
        self._lock = None
        if left:
            raise RuntimeError(f"left behind after stop(): {left}")

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then remove the namespaces, veths and bridge."""
        try:
            super().stop()
        finally:
            self._teardown_net()

    # ---- slurm ----------------------------------------------------------------------------------

    def slurm_conf(self) -> str:
        conf = super().slurm_conf()
        d = self.dir
        repl = {
            "# One-node test cluster": "# Two-node (network namespaces) test cluster",
            "SlurmctldHost=": None,
            "SlurmdSpoolDir=": f"SlurmdSpoolDir={d}/slurmd_spool/%n",
            "SlurmdPidFile=": f"SlurmdPidFile={d}/run/slurmd-%n.pid",
            "SlurmdLogFile=": f"SlurmdLogFile={d}/log/slurmd-%n.log",
            "NodeName=": None,
            "PartitionName=": None,
        }
        lines = []
        for line in conf.splitlines():
            key = next((k for k in repl if line.startswith(k)), None)
            if key is None:
                lines.append(line)
            elif key == "SlurmctldHost=":
                lines.append(f"SlurmctldHost={short_hostname()}({self.BRIDGE_ADDR})")
            elif key == "NodeName=":
                lines += [f"NodeName={n} NodeAddr={a} CPUs={self.cpus} "
                          f"RealMemory={self.real_memory} State=UNKNOWN"
                          for n, a in self.node_addr.items()]
            elif key == "PartitionName=":
                lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES "
                             "MaxTime=INFINITE State=UP OverSubscribe=NO")
            else:
                lines.append(repl[key])
        return "\n".join(lines) + "\n"

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; munged is not our child (it daemonizes).
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return True


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _user_exists(name: str) -> bool:
    import pwd
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _self_check() -> int:
    def say(*a):
        print(*a, flush=True)

    with tempfile.TemporaryDirectory(prefix="slurm-selfcheck-") as tmp:
        tmp = Path(tmp)
        ver = _run(["slurmctld", "-V"]).stdout.strip() if shutil.which("slurmctld") else "?"
        c = SlurmCluster(tmp / "cluster")
        c.start()
        try:
            ver = _run(["slurmctld", "-V"]).stdout.strip()
            say(f"{ver}: node {c.node} idle after {c.start_seconds:.1f} s; conf {c.conf}")
            say(c.conf.read_text())

            work = tmp / "work"
            work.mkdir()
            out = work / "hello.out"
            job = c.sbatch(["--job-name=hello", f"--output={out}", "--wrap", "hostname; srun hostname"],
                           cwd=work)
            res = c.wait(job, timeout=120)
            text = out.read_text() if out.exists() else "<no output file>"
            say(f"job {job}: JobState={res} ExitCode={res.exit_code}\n--- output ---\n{text}---")
            assert res == "COMPLETED" and res.exit_code == "0:0", (res, res.exit_code, text)
            assert text.split() == [c.node, c.node] or len(text.split()) == 2, text

            job = c.sbatch(["--job-name=sleeper", "--requeue", f"--output={work}/sleep-%j.out",
                            "--wrap", "echo start; sleep 60"], cwd=work)
            info = c.wait_state(job, "RUNNING", timeout=60)
            say(f"job {job}: {info['JobState']} Restarts={info.get('Restarts')}")
            t = time.monotonic()
            c.requeue(job)
            info = c.job_info(job)
            say(f"after requeue: JobState={info['JobState']} Restarts={info.get('Restarts')} "
                f"Reason={info.get('Reason')} EligibleTime={info.get('EligibleTime')}")
            info = c.wait_state(job, "RUNNING", timeout=240)
            say(f"running again after {time.monotonic() - t:.1f} s: JobState={info['JobState']} "
                f"Restarts={info.get('Restarts')}")
            assert info.get("Restarts") == "1", info
            c.cancel(job)
            res = c.wait(job, timeout=60)
            say(f"after scancel: JobState={res} ExitCode={res.exit_code}")
            assert res == "CANCELLED", res
        finally:
            t = time.monotonic()
            c.stop()
            say(f"stopped in {time.monotonic() - t:.1f} s")
        assert not any(p.poll() is None for p in c._procs.values())
    say("SELF-CHECK PASSED")
    return 0


ALLREDUCE_PY = """\
import os, socket, datetime, torch, torch.distributed as dist
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=int(os.environ.get("DIST_TIMEOUT", "60"))))
t = torch.tensor([float(rank + 1), 10.0 * (rank + 1)])
dist.all_reduce(t)
print(f"rank {rank}/{world} on {os.environ.get('SLURMD_NODENAME')} "
      f"(hostname {socket.gethostname()}, MASTER_ADDR {os.environ['MASTER_ADDR']}, "
      f"GLOO_SOCKET_IFNAME {os.environ.get('GLOO_SOCKET_IFNAME')}): all_reduce -> {t.tolist()}",
      flush=True)
dist.destroy_process_group()
"""


def _self_check_two_nodes() -> int:
    """Start the two-node (network namespace) cluster, run a 2-node job that prints each node's
    address, then a 2-process torch.distributed gloo all_reduce across the nodes."""
    def say(*a):
        print(*a, flush=True)

    python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    if not python.exists():
        python = Path(sys.executable)
    with tempfile.TemporaryDirectory(prefix="slurm-2n-selfcheck-") as tmp:
        tmp = Path(tmp)
        c = NetnsSlurmCluster(tmp / "cluster")
        c.start()
        try:
            say(f"{_run(['slurmctld', '-V']).stdout.strip()}: nodes {c.nodes} idle after "
                f"{c.start_seconds:.1f} s (network {c.net_seconds:.1f} s, pings host<->ns and "
                f"ns<->ns ok); namespaces {list(c.netns.values())}, bridge {c.bridge}")
            say(c.conf.read_text())
            say(c.cmd(["sinfo", "-N", "-o", "%N %T %c %m %o"]).stdout)
            work = tmp / "work"
            work.mkdir()

            out = work / "addr.out"
            job = c.sbatch(["-N", "2", "--ntasks-per-node", "1", f"--output={out}", "--wrap",
                            'srun bash -c "echo \\$SLURMD_NODENAME \\$(hostname) \\$(hostname -I)"'],
                           cwd=work)
            res = c.wait(job, timeout=120)
            text = out.read_text() if out.exists() else "<no output file>"
            say(f"job {job} (-N 2): JobState={res} ExitCode={res.exit_code} "
                f"NodeList={res.info.get('NodeList')}\n--- output ---\n{text}---")
            assert res == "COMPLETED" and res.exit_code == "0:0", (res, res.exit_code, text)
            for n, a in c.node_addr.items():
                assert any(l.split()[:1] == [n] and a in l.split() for l in text.splitlines()), \
                    (n, a, text)

            script = work / "allreduce.py"
            script.write_text(ALLREDUCE_PY)
            variants = [("with GLOO_SOCKET_IFNAME=eth0", "export GLOO_SOCKET_IFNAME=eth0", True)]
            if "--also-without-ifname" in sys.argv:
                variants.append(("without GLOO_SOCKET_IFNAME", "unset GLOO_SOCKET_IFNAME", False))
            for label, ifname, must_pass in variants:
                out = work / f"allreduce-{len(label)}.out"
                batch = work / f"allreduce-{len(label)}.sh"
                batch.write_text(f"""#!/bin/bash
export MASTER_ADDR={c.node_addr['n1']} MASTER_PORT={free_port()} WORLD_SIZE=2 DIST_TIMEOUT=30
{ifname}
srun -N2 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID exec {python} {script}'
""")
                t = time.monotonic()
                job = c.sbatch(["-N", "2", "--ntasks-per-node", "1", "--time=3",
                                f"--output={out}", str(batch)], cwd=work)
                res = c.wait(job, timeout=240)
                text = out.read_text() if out.exists() else "<no output file>"
                say(f"job {job} all_reduce {label}: JobState={res} ExitCode={res.exit_code} "
                    f"in {time.monotonic() - t:.1f} s\n--- output ---\n{text}---")
                if must_pass:
                    assert res == "COMPLETED" and res.exit_code == "0:0", (res, text)
                    lines = [l for l in text.splitlines() if "all_reduce -> [3.0, 30.0]" in l]
                    assert len(lines) == 2, text
        finally:
            t = time.monotonic()
            c.stop()
            say(f"stopped (daemons, namespaces, veths, bridge) in {time.monotonic() - t:.1f} s")
        left = _run(["ip", "-o", "link", "show"]).stdout + _run(["ip", "netns", "list"]).stdout
        assert c.bridge not in left and not any(ns in left for ns in c.netns.values()), left
        assert not any(p.poll() is None for p in c._procs.values())
    say("TWO-NODE SELF-CHECK PASSED")
    return 0


if __name__ == "__main__":
    # python tests/slurm_cluster.py               the one-node SlurmCluster
    # python tests/slurm_cluster.py --two-nodes   NetnsSlurmCluster (root; also
    #                                             --also-without-ifname: gloo without GLOO_SOCKET_IFNAME)
    sys.exit(_self_check_two_nodes() if "--two-nodes" in sys.argv else _self_check())
