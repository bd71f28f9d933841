"""A two-node Slurm cluster on this one machine, each slurmd in its own network namespace
(``NetnsSlurmCluster``, a SlurmCluster that differs in its nodes, their network and how their
slurmd start). Needs root and ``ip``/``nsenter``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from slurm_cluster import SlurmCluster
from slurm_install import alive, run, start_time

NETNS_DIR = Path("/var/run/netns")
NETNS_PREFIX = "slurmtest-"          # namespaces:  slurmtest-<tag>-n1, slurmtest-<tag>-n2
LINK_PREFIX = "slt"                  # links: bridge slt<tag>b, host veth ends slt<tag>v1/v2
NETNS_LOCK = Path(tempfile.gettempdir()) / "slurm_netns_cluster.lock"
PING = Path(__file__).resolve().with_name("slurm_ping.py")


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
        self.tag = hashlib.sha1(f"{self.dir}:{os.getpid()}".encode()).hexdigest()[:6]
        self.nodes = ["n1", "n2"]
        self.node = self.nodes[0]
        self.cpus = 1
        self.real_memory = mem_per_node
        self.node_addr = {n: f"{self.SUBNET_PREFIX}.{11 + i}" for i, n in enumerate(self.nodes)}
        self.ctld_addr = self.BRIDGE_ADDR
        self.netns = {n: f"{NETNS_PREFIX}{self.tag}-{n}" for n in self.nodes}
        self.bridge = f"{LINK_PREFIX}{self.tag}b"
        self.host_veth = {n: f"{LINK_PREFIX}{self.tag}v{i + 1}" for i, n in enumerate(self.nodes)}
        self._lock = None
        self.net_seconds = None

    # ---- network (set up by start() through _prepare, removed by stop()) ------------------------

    def netns_path(self, node: str) -> str:
        return str(NETNS_DIR / self.netns[node])

    def in_node(self, node: str, argv: list[str]) -> list[str]:
        """argv run inside that node's network namespace (nsenter --net=...)."""
        return ["nsenter", f"--net={self.netns_path(node)}", *map(str, argv)]

    def ping(self, addr: str, node: str | None = None) -> bool:
        """One ICMP echo to addr, from the host (node None) or from inside that node's namespace."""
        argv = [sys.executable, str(PING), addr]
        r = run(self.in_node(node, argv) if node else argv, timeout=30)
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
        busy = run(["ip", "-o", "addr", "show", "to", f"{self.SUBNET_PREFIX}.0/24"]).stdout.strip()
        if busy:
            raise RuntimeError(f"{self.SUBNET_PREFIX}.0/24 is already used on the host:\n{busy}")

        def ip(*args, ns=None):
            argv = ["ip", *(["-n", ns] if ns else []), *args]
            r = run(argv, timeout=30)
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
                                   + run(["ip", "-br", "addr"]).stdout)
        self.net_seconds = time.monotonic() - t0

    @staticmethod
    def _kill_netns_pids(ns: str) -> None:
        pids = run(["ip", "netns", "pids", ns]).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(int(p)) for p in pids if p.isdigit()):
            time.sleep(0.1)

    def _remove_stale(self, daemons: list[str] = ()) -> None:
        """(Lock held.) Stop the daemons (``PID:STARTTIME``) and remove the namespaces and links
        of earlier runs that were not stopped."""
        for entry in daemons:
            pid, _, start = entry.partition(":")
            with contextlib.suppress(ValueError, ProcessLookupError):
                if start and start_time(int(pid)) == start:   # the same process, not a reused pid
                    os.kill(int(pid), signal.SIGKILL)
        for line in run(["ip", "netns", "list"]).stdout.splitlines():
            ns = line.split()[0] if line.split() else ""
            if ns.startswith(NETNS_PREFIX):
                self._kill_netns_pids(ns)
                run(["ip", "netns", "del", ns])
        for link in self._our_links(any_tag=True):
            run(["ip", "link", "del", link])

    def _our_links(self, any_tag: bool = False) -> list[str]:
        out = run(["ip", "-o", "link", "show"]).stdout
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
            run(["ip", "link", "del", self.host_veth[n]])   # takes eth0 in the namespace along
            run(["ip", "netns", "del", ns])
        run(["ip", "link", "del", self.bridge])
        left = self._our_links() + [n for n in self.netns.values() if (NETNS_DIR / n).exists()]
        self._lock.truncate(0)
        self._lock.close()   # releases the flock
        self._lock = None
        if left:
            raise RuntimeError(f"left behind after stop(): {left}")

    # ---- the daemons: each slurmd in its node's namespace -----------------------------------------

    def _slurmd_argv(self, node: str) -> list[str]:
        return self.in_node(node, super()._slurmd_argv(node))

    def _spawn_slurmds(self) -> None:
        super()._spawn_slurmds()
        # The daemons' pids (with their start times) go into the lock file, so that a later run
        # can stop them if this one is killed before stop() (slurmctld runs outside the namespaces).
        if self._lock is not None:
            self._lock.write("".join(f"{p.pid}:{start_time(p.pid)}\n" for p in self._procs.values()))
            self._lock.flush()

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then remove the namespaces, veths and bridge."""
        try:
            super().stop()
        finally:
            self._teardown_net()
