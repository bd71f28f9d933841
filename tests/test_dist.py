"""The trainer's collectives live where the process group's backend wants them. Under NCCL a
tensor built on the CPU fails ("No backend type associated with device type cpu"): checked here
without a GPU, with the meta device standing in for CUDA and a recording all_reduce."""
import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT
from pipeline import dist as comm_module
from pipeline.dist import Comm

COLLECTIVES = {"all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
               "reduce", "reduce_scatter", "barrier", "gather", "scatter"}


@pytest.fixture
def fake_group(monkeypatch):
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return seen


@pytest.mark.parametrize("backend,device,expected", [
    ("nccl", "meta", "meta"), ("cpu:gloo,cuda:nccl", "meta", "meta"), ("gloo", "cpu", "cpu"), ("nccl", "cpu", "cpu")])
def test_collective_tensors_on_the_backends_device(monkeypatch, fake_group, backend, device, expected):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    comm = Comm(torch.device(device))
    t = comm.zeros(7)
    t[3] += 1.0  # what the training step does: Python scalars, no host-to-device copy
    comm.sum(t)
    assert fake_group == [torch.device(expected)]


def test_a_cpu_tensor_under_nccl_is_refused(monkeypatch, fake_group):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    comm = Comm(torch.device("meta"))
    with pytest.raises(ValueError, match="needs meta"):
        comm.sum(torch.zeros(3))
    assert fake_group == []


def test_pipeline_calls_collectives_only_through_the_helper():
    """The bug this guards against: torch.distributed called with tensors made where the backend
    cannot take them. Every collective in pipeline/ goes through pipeline/dist.py."""
    offenders = []
    for path in sorted((ROOT / "pipeline").glob("*.py")):
        if path.name == Path(comm_module.__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                src = ast.unparse(node.value)
                if src.endswith("distributed") or src == "dist":
                    offenders.append(f"{path.name}:{node.lineno} {src}.{node.attr}")
    assert offenders == []
