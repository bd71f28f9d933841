"""What the trainer reads: a memory-mapped split, a resumable distributed sampler, and the
dynamic masking collator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError

from .manifest import load_manifest, verify


class PackedDataset:
    """One split of an OUT directory; rows are zero-copy views into the memory-mapped shards."""

    def __init__(self, out: Path | str, split: str = "train", check: bool = False):
        self.out = Path(out)
        self.manifest = load_manifest(self.out)
        if check:
            problems = verify(self.out)
            if problems:
                raise UserError("; ".join(problems))
        if split not in self.manifest["splits"]:
            raise UserError(f"{self.out / 'manifest.json'}: no split {split!r}")
        self.seq_len = self.manifest["seq_len"]
        shards = self.manifest["splits"][split]["shards"]
        self.tokens = [np.load(self.out / s["path"], mmap_mode="r") for s in shards]
        self.bits = [np.load(self.out / s["boundaries"]["path"], mmap_mode="r") for s in shards]
        self.offsets = np.cumsum([0] + [len(t) for t in self.tokens])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.tokens[s][i - self.offsets[s]], self.bits[s][i - self.offsets[s]]

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """[B, seq_len] token ids and [B, ceil(seq_len/8)] packed boundary bits."""
        rows = [self[int(i)] for i in indices]
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


class ResumableSampler:
    """Deterministic order per epoch, split across ranks, resumable at a global sample count.

    Positions are global: position p of the stream is sample order_e[p % n] of epoch
    e = p // n (n = samples per epoch, trimmed to a multiple of world_size). A global batch
    takes the next batch_size * world_size positions and rank r the r-th slice of them, so
    `consumed` (the same number on every rank) is all a checkpoint needs."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 consumed: int = 0):
        self.per_epoch = num_samples // world_size * world_size
        if self.per_epoch == 0:
            raise UserError(f"{num_samples} sequences cannot be split across {world_size} ranks")
        self.rank, self.world_size, self.seed, self.consumed = rank, world_size, seed, consumed
        self._epoch, self._order = -1, None

    @property
    def epoch(self) -> int:
        return self.consumed // self.per_epoch

    def _order_of(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.per_epoch)
            self._epoch = epoch
        return self._order

    def next_batch(self, batch_size: int) -> np.ndarray:
        """This rank's indices for the next global batch; advances `consumed` for every rank."""
        start = self.consumed + self.rank * batch_size
        pos = np.arange(start, start + batch_size)
        out = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(pos // self.per_epoch):
            sel = pos // self.per_epoch == epoch
            out[sel] = self._order_of(int(epoch))[pos[sel] % self.per_epoch]
        self.consumed += batch_size * self.world_size
        return out


def cu_seqlens(segment_ids: torch.Tensor) -> torch.Tensor:
    """int32 cumulative document lengths over the flattened batch, for variable-length attention.
    The collator builds it on the CPU (data-dependent size: on the GPU it would cost a
    device-to-host sync every forward); the model falls back to it on the device."""
    B, L = segment_ids.shape
    flat = (segment_ids.long() + torch.arange(B, device=segment_ids.device)[:, None] * L).reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::L] = True  # a row never continues the one before it
    idx = torch.nonzero(starts).squeeze(1)
    return torch.cat([idx, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)


class MaskingCollator:
    """Dynamic MLM masking, vectorised: each token (or each whole word) is chosen with
    probability mlm_probability; chosen tokens become [MASK] 80 %, a random token 10 %, stay
    10 %. Special tokens and padding are never chosen."""

    def __init__(self, vocab_size: int, special_ids: dict[str, int], mlm_probability: float = 0.15,
                 whole_word: bool = False, tokenizer=None):
        self.vocab_size = vocab_size
        self.mask_id, self.pad_id = special_ids["mask"], special_ids["pad"]
        self.mlm_probability = mlm_probability
        special = torch.zeros(vocab_size, dtype=torch.bool)
        special[list(special_ids.values())] = True
        self.special = special
        self.random_pool = torch.nonzero(~special).squeeze(1)
        self.continuation = None
        if whole_word:
            if tokenizer is None:
                raise ValueError("whole-word masking needs the tokenizer (to find '##' pieces)")
            cont = torch.zeros(vocab_size, dtype=torch.bool)
            for token, i in tokenizer.get_vocab().items():
                if token.startswith("##") and i < vocab_size:
                    cont[i] = True
            self.continuation = cont

    def __call__(self, tokens: np.ndarray, bits: np.ndarray, generator: torch.Generator) -> dict:
        ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        L = ids.shape[1]
        starts = torch.from_numpy(np.unpackbits(np.asarray(bits), axis=1, count=L).astype(bool))
        segment_ids = torch.cumsum(starts, dim=1, dtype=torch.int32) - 1
        attention_mask = ids != self.pad_id
        maskable = ~self.special[ids]
        rand = torch.rand(ids.shape, generator=generator)
        if self.continuation is not None:
            # A word's decision is the draw at its first piece; a word never crosses documents.
            word_start = ~self.continuation[ids] | starts
            pos = torch.arange(L).expand_as(ids) * word_start
            first_piece = torch.cummax(pos, dim=1).values
            rand = rand.gather(1, first_piece)
        chosen = (rand < self.mlm_probability) & maskable
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        how = torch.rand(ids.shape, generator=generator)
        random_ids = self.random_pool[torch.randint(len(self.random_pool), ids.shape,
                                                    generator=generator)]
        input_ids = torch.where(chosen & (how < 0.8), torch.full_like(ids, self.mask_id), ids)
        input_ids = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, input_ids)
        # Computed here, on the CPU, so that the training step reads nothing back from the GPU:
        # document bounds over the flattened batch (varlen attention), the predicted positions
        # (the MLM head runs on those only), and sum of document length^2 (attention FLOPs).
        cu = cu_seqlens(segment_ids)
        lengths = (cu[1:] - cu[:-1]).long()
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "segment_ids": segment_ids, "cu_seqlens": cu,
                "mlm_index": torch.nonzero(labels.reshape(-1) != -100).squeeze(1),
                "attention_pairs": int((lengths * lengths).sum())}
