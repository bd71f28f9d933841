"""The trainer's own collectives, in one place.

NCCL process groups accept only CUDA tensors ("No backend type associated with device type
cpu"); gloo accepts CPU tensors. Every tensor the trainer sends through torch.distributed is made
here, on the device the group's backend wants, so a GPU run cannot fail where a CPU run passed.
Objects (the ticket) go through broadcast_object_list, which moves them itself.
"""
from __future__ import annotations

import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free local TCP port, for a process group of one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collective_device(device: torch.device) -> torch.device:
    """Where tensors for the default group must live: the engine's CUDA device when the group
    has NCCL for CUDA, else the CPU."""
    backend = str(dist.get_backend())
    if device.type != "cpu" and "nccl" in backend:
        return device
    return torch.device("cpu")


class Comm:
    """Sums and agreements across ranks, on the right device. Only `values()` reads back to the
    host: the one device-to-host sync a training step makes."""

    def __init__(self, device: torch.device):
        self.device = collective_device(device)

    def zeros(self, n: int, dtype=torch.float64) -> torch.Tensor:
        return torch.zeros(n, dtype=dtype, device=self.device)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """In place, summed over ranks; `t` must come from zeros() (or live on self.device)."""
        if t.device != self.device:
            raise ValueError(f"collective tensor on {t.device}, the process group needs {self.device}")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def agree(self, flag: bool | int) -> bool:
        """True on every rank when any rank's flag is set."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self.device)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()
