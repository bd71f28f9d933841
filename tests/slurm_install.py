"""What the test clusters need from the host: the Slurm packages (installed with apt-get when
missing; needs root, as in CI), a munge daemon (started when none answers), and small process
helpers (run a command, tail a log, is a pid alive, a process's start time).

munge keeps its usual key (``/etc/munge/munge.key``, created when missing) and socket
(``/run/munge``); ``start_munge()`` returns the pid of the munged it started (None when one
already answered), for ``stop_munge()``.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "iproute2"]  # ip: the 2-node cluster
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN_DIR = Path("/run/munge")
MUNGE_USER = "munge"


# ---- processes ----------------------------------------------------------------------------------

def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"<{e}>"


def alive(pid: int) -> bool:
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


def start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/PID/stat), "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


# ---- packages -----------------------------------------------------------------------------------

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
            policy.write_text("#!/bin/sh\n# tests/slurm_install.py: no service starts\nexit 101\n")
            policy.chmod(0o755)
        try:
            r = run(install, env=env)
            if r.returncode != 0:
                u = run(["apt-get", "update", "-q"], env=env)
                r = run(install, env=env)
                if r.returncode != 0:
                    raise RuntimeError(f"apt-get install {' '.join(SLURM_PACKAGES)} failed:\n"
                                       f"{u.stdout[-2000:]}{u.stderr[-2000:]}\n{r.stdout[-3000:]}"
                                       f"{r.stderr[-3000:]}")
        finally:
            if own_policy:
                policy.unlink(missing_ok=True)
        if not slurm_installed():
            raise RuntimeError("apt-get installed the Slurm packages but their commands are missing")


# ---- munge --------------------------------------------------------------------------------------

def munge_works() -> bool:
    try:
        m = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if m.returncode != 0:
            return False
        u = subprocess.run(["unmunge"], input=m.stdout, capture_output=True, timeout=10)
        return u.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def start_munge() -> int | None:
    """Start munged unless a munge daemon answers; the pid of the one started, else None."""
    if munge_works():
        return None
    if os.geteuid() != 0:
        raise RuntimeError("no munge daemon answers (munge -n | unmunge) and starting one needs root")
    have_user = user_exists(MUNGE_USER)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        if shutil.which("mungekey"):
            run(["mungekey", "--create", f"--keyfile={MUNGE_KEY}"], check=True)
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
    r = run(argv, timeout=30)  # daemonizes; returns once it serves
    deadline = time.monotonic() + 15
    while not munge_works() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not munge_works():
        raise RuntimeError(f"munged did not start ({' '.join(argv)} -> {r.returncode}):\n"
                           f"{r.stdout}{r.stderr}\n{tail(Path('/var/log/munge/munged.log'))}")
    with contextlib.suppress(OSError, ValueError):
        return int(pid_file.read_text().strip())
    return None


def stop_munge(pid: int) -> None:
    """SIGTERM the munged start_munge() started; wait (up to 10 s) until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
