"""A 2-node Slurm job on this one machine: two slurmd in their own network namespaces joined by
veth links (slurm_netns.NetnsSlurmCluster), one rank per node training over gloo, and the same
losses as one node with two ranks on the same data."""
import os

import pytest

from conftest import ROOT
from helpers import ds_config, pretrain_env, run_train, steps, train_args, train_cmd
from slurm_netns import NetnsSlurmCluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and Slurm need root")


def test_two_nodes_train_together(tmp_path, small_data):
    cfg = ds_config(tmp_path, "cpu.json")
    common = dict(max_steps=8, dropout=0, eval_every=0, checkpoint_every=4, earlybird="off")
    ref = tmp_path / "one_node"
    r = run_train(train_cmd(2), *train_args(cfg, small_data, ref, **common))
    assert r.returncode == 0, r.stderr[-2000:]
    run = tmp_path / "two_nodes"
    with NetnsSlurmCluster(tmp_path / "slurm") as cluster:
        # Inside a namespace the host name resolves to the namespace's own loopback: gloo must
        # use the veth interface (what a cluster sets to its fabric's interface).
        env = pretrain_env(cluster.env, tmp_path / "logs", NPROC="1", GLOO_SOCKET_IFNAME="eth0")
        job = cluster.cmd(["sbatch", "--parsable", "-N", "2", "--gpus-per-node=0", "--cpus-per-task=1",
                           "--mem=0", f"--output={tmp_path}/%x-%j.out", str(ROOT / "slurm" / "pretrain.sh"),
                           *train_args(cfg, small_data, run, **common)],
                          cwd=tmp_path, env=env).stdout.strip()
        result = cluster.wait(job, timeout=600)
        out = (tmp_path / f"earlybert-{job}.out").read_text()
        stage_log = (tmp_path / "logs" / f"earlybert-{job}-search.log").read_text()
        assert result == "COMPLETED" and result.returncode == 0, out[-2000:] + stage_log[-3000:]
    assert "2 node(s) x 1 process(es), rendezvous 10.77.0.11" in out
    a, b = steps(ref), steps(run)
    assert [x["step"] for x in b] == list(range(1, 9)) and b[-1]["samples"] == 8 * 4 * 2 * 2
    for x, y in zip(a, b):
        assert x["samples"] == y["samples"] and x["lr"] == y["lr"]
        assert abs(x["loss"] - y["loss"]) < 1e-6, (x, y)
