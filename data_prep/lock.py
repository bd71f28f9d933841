"""OUT/.lock: one build or merge writes OUT at a time. A resubmitted or requeued Slurm merge, or a
second `data_prep build` on the same OUT, must not pack into the files the first one is writing.

An exclusive POSIX record lock (fcntl F_SETLK) on OUT/.lock, held while the build runs: the kind
NFS and Lustre carry between nodes, and one that forked workers do not inherit (an orphaned worker
must not keep OUT locked). The kernel (or the NFS server's lock lease, for a node that died)
releases it when its holder dies however it dies, so a lock left by a killed build is never
mistaken for a live one and is simply taken. The file names its holder (host, pid, Slurm job,
since when) for the message a second build gets. On a file system without working locks (some
Lustre mounts without -o flock or localflock) the build warns and goes on unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

NAME = ".lock"


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode("utf-8", "replace").strip()


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        job = f", Slurm job {h['job']}" if h.get("job") else ""
        return f"pid {h['pid']} on {h['host']}{job}, since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h['since']))}"
    except (ValueError, TypeError, KeyError):
        return "a holder that has not written its name yet"


@contextmanager
def out_lock(out: Path) -> Iterator[None]:
    """Holds OUT/.lock for the block. Held by a live process: UserError naming it."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{out}: another data_prep build or merge is writing it ({_describe(_read(fd))}; "
                                f"{path}). Wait for it to end, or stop it") from None
            print(f"warning: {path}: this file system does not lock ({e.strerror}); make sure no other build "
                  f"writes {out}", file=sys.stderr)
        before = _read(fd)
        if before:  # the holder died without releasing it: the kernel already did
            print(f"{path}: taking the lock left by {_describe(before)} (no longer running)", file=sys.stderr)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "job": os.environ.get("SLURM_JOB_ID"),
                  "since": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: the next build has nothing to take over
    finally:
        os.close(fd)
