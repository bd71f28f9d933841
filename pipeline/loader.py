"""Training batches prepared ahead of the step that needs them.

A background thread reads the memory-mapped rows, masks them (numpy and torch CPU work that
releases the GIL) and, on CUDA, pins them, while the GPU runs the current step; the step then
copies them with non_blocking=True. What a batch holds is a function of its position in the
sample stream alone (the sampler's order and a masking seed from (seed, position)), so running
ahead changes nothing: each batch carries the consumed-sample count after it, and that is what
a checkpoint records. `wait_s` is the time the step spent waiting for data.
"""
from __future__ import annotations

import queue
import threading
import time

import torch

FORWARD_KEYS = ("input_ids", "segment_ids", "labels", "cu_seqlens", "mlm_index")


class Prefetcher:
    def __init__(self, dataset, sampler, collate, micro: int, rank: int, seed: int, pin: bool,
                 depth: int = 4):
        self.dataset, self.sampler, self.collate = dataset, sampler, collate
        self.micro, self.rank, self.seed, self.pin = micro, rank, seed, pin
        self.wait_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="prefetch", daemon=True)
        self._thread.start()

    def _make(self):
        pos = self.sampler.consumed + self.rank * self.micro  # this micro batch's first global position
        idx = self.sampler.next_batch(self.micro)
        gen = torch.Generator().manual_seed(hash((self.seed, pos)) & 0x7FFFFFFFFFFFFFFF)
        batch = self.collate(*self.dataset.batch(idx), gen)
        if self.pin:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch, self.sampler.consumed

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._make()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training loop, which raises it
            self._queue.put(e)

    def next(self) -> tuple[dict, int]:
        """(batch, consumed-sample count once this micro batch is taken)."""
        t = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def to_device(batch: dict, device: torch.device) -> dict:
    """The forward's inputs on the device (asynchronous from pinned memory)."""
    return {k: batch[k].to(device, non_blocking=True) for k in FORWARD_KEYS if k in batch}
