"""Training batches prepared ahead of the step that needs them.

One loader worker process (torch's DataLoader) reads the memory-mapped rows and masks them
while the GPU runs the current step; on CUDA a pin thread pins them and the step copies them with
non_blocking=True. A process, not a thread: the training loop's own Python (launching a step's
~2000 kernels) is the bottleneck of an eager BERT step on a GPU, and a thread would take the GIL
from it (measured on an H100: bert-base 0.053 s/step with a loader thread, 0.042 s without).

What a batch holds is a function of its position in the sample stream alone (the sampler's order
and a masking seed from (seed, position)), so running ahead changes nothing: each batch carries
the consumed-sample count after it, and that is what a checkpoint records. One worker keeps the
order. `wait_s` is the time the step spent waiting for data.
"""
from __future__ import annotations

import signal
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

FORWARD_KEYS = ("input_ids", "segment_ids", "labels", "cu_seqlens", "mlm_index")


class _Stream(IterableDataset):
    """Micro batches from `consumed` on, each with the consumed count after it."""

    def __init__(self, dataset, make_sampler, collate, micro: int, rank: int, seed: int):
        self.dataset, self.make_sampler, self.collate = dataset, make_sampler, collate
        self.micro, self.rank, self.seed = micro, rank, seed

    def __iter__(self):
        sampler = self.make_sampler()
        while True:
            pos = sampler.consumed + self.rank * self.micro  # this micro batch's first global position
            idx = sampler.next_batch(self.micro)
            gen = torch.Generator().manual_seed(hash((self.seed, pos)) & 0x7FFFFFFFFFFFFFFF)
            batch = self.collate(*self.dataset.batch(idx), gen)
            batch["consumed"] = sampler.consumed
            yield batch


def _worker_init(_):
    # Stop requests are the trainer's to handle (it checkpoints first); the worker ends with it.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)


class Prefetcher:
    def __init__(self, dataset, make_sampler, collate, micro: int, rank: int, seed: int, pin: bool,
                 depth: int = 4):
        """make_sampler: builds the ResumableSampler at the consumed count to start from (it is
        called in the worker, which owns the sampler from then on)."""
        self.wait_s = 0.0
        stream = _Stream(dataset, make_sampler, collate, micro, rank, seed)
        self._loader = DataLoader(stream, batch_size=None, num_workers=1, pin_memory=pin,
                                  prefetch_factor=depth, worker_init_fn=_worker_init,
                                  multiprocessing_context="fork")
        self._it = iter(self._loader)

    def next(self) -> tuple[dict, int]:
        """(batch, consumed-sample count once this micro batch is taken)."""
        t = time.perf_counter()
        batch = next(self._it)
        self.wait_s += time.perf_counter() - t
        return batch, int(batch.pop("consumed"))

    def close(self) -> None:
        shutdown = getattr(self._it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._it = None


def to_device(batch: dict, device: torch.device) -> dict:
    """The forward's inputs on the device (asynchronous from pinned memory)."""
    return {k: batch[k].to(device, non_blocking=True) for k in FORWARD_KEYS if k in batch}
