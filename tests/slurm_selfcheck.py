"""Self-check of the test clusters, outside pytest (root; installs Slurm when missing):

    python tests/slurm_selfcheck.py               the one-node SlurmCluster: a job, a requeue, a cancel
    python tests/slurm_selfcheck.py --two-nodes   NetnsSlurmCluster: a 2-node job, then a gloo
                                                  all_reduce across the nodes (also
                                                  --also-without-ifname: without GLOO_SOCKET_IFNAME)
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from slurm_cluster import SlurmCluster, free_port
from slurm_install import run
from slurm_netns import NetnsSlurmCluster


def _self_check() -> int:
    def say(*a):
        print(*a, flush=True)

    with tempfile.TemporaryDirectory(prefix="slurm-selfcheck-") as tmp:
        tmp = Path(tmp)
        ver = run(["slurmctld", "-V"]).stdout.strip() if shutil.which("slurmctld") else "?"
        c = SlurmCluster(tmp / "cluster")
        c.start()
        try:
            ver = run(["slurmctld", "-V"]).stdout.strip()
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
            say(f"{run(['slurmctld', '-V']).stdout.strip()}: nodes {c.nodes} idle after "
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
        left = run(["ip", "-o", "link", "show"]).stdout + run(["ip", "netns", "list"]).stdout
        assert c.bridge not in left and not any(ns in left for ns in c.netns.values()), left
        assert not any(p.poll() is None for p in c._procs.values())
    say("TWO-NODE SELF-CHECK PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(_self_check_two_nodes() if "--two-nodes" in sys.argv else _self_check())
