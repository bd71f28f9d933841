"""EarlyBERT's ticket drawing and the early-bird rule (see shared/EARLYBERT.md).

Masks are lists with one boolean array per layer (True = kept). Heads are pruned layer-wise
(the k smallest |gate| of every layer), FFN neurons globally (the fraction p of smallest |gate|
across all layers). Selection is top-k on |gate| with a deterministic tie-break: equal values
keep the lower index (and, across layers, the lower layer), so equal gates never prune
everything the way the released code's `> quantile` threshold does.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


def default_prune_heads(heads: int) -> int:
    """The paper's 4 of 12; one third of the heads otherwise."""
    return 4 if heads == 12 else heads // 3


def _keep_largest(values: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask of the `keep` largest values; ties go to the lower index."""
    order = np.lexsort((np.arange(len(values)), -values))  # by value desc, then index asc
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:keep]] = True
    return mask


def head_masks(gates: list[np.ndarray], prune: int | list[int]) -> list[np.ndarray]:
    per_layer = prune if isinstance(prune, list) else [prune] * len(gates)
    masks = []
    for i, (g, k) in enumerate(zip(gates, per_layer)):
        if not 0 <= k < len(g):
            raise ValueError(f"--prune_heads {k}: layer {i} has {len(g)} heads; at least one must stay")
        masks.append(_keep_largest(np.abs(np.asarray(g, dtype=np.float64)), len(g) - k))
    return masks


def ffn_masks(gates: list[np.ndarray], fraction: float) -> list[np.ndarray]:
    """Global: the fraction of neurons with the smallest |gate| across all layers is dropped.
    A layer is never emptied: it keeps its largest neuron in place of the next global one."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--prune_ffn {fraction}: must be in [0, 1)")
    sizes = [len(g) for g in gates]
    flat = np.abs(np.concatenate([np.asarray(g, dtype=np.float64) for g in gates]))
    keep = len(flat) - int(round(fraction * len(flat)))
    keep = max(keep, len(gates))
    # Each layer's largest neuron first, then the rest by |gate| (ties: lower position).
    bounds = np.cumsum([0] + sizes)
    firsts = [b + int(_keep_largest(flat[b:e], 1).argmax()) for b, e in zip(bounds[:-1], bounds[1:])]
    rank = flat.copy()
    rank[firsts] = np.inf
    mask = _keep_largest(rank, keep)
    return [mask[b:e] for b, e in zip(bounds[:-1], bounds[1:])]


def mask_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Normalised Hamming distance: the fraction of units on which two masks disagree."""
    x, y = np.concatenate(a), np.concatenate(b)
    if x.shape != y.shape:
        raise ValueError(f"masks of different shapes: {x.shape} vs {y.shape}")
    return float(np.mean(x != y))


@dataclass
class EarlyBirdRule:
    """The ticket has emerged when the newest mask is within `epsilon` of each of the
    `window - 1` older ones, for heads and for FFN alike, at step >= min_steps; at
    max_steps the ticket is drawn regardless (the fallback)."""
    window: int = 5
    epsilon: float = 0.1
    min_steps: int = 100
    max_steps: int = 400
    history: deque = field(default_factory=deque)

    def update(self, step: int, heads: list[np.ndarray], ffn: list[np.ndarray]) -> tuple[str | None, dict]:
        """Add one snapshot's masks; returns (reason the ticket is drawn or None, distances)."""
        self.history.append((step, heads, ffn))
        while len(self.history) > self.window:
            self.history.popleft()
        older = list(self.history)[:-1]
        d = {"step": step,
             "heads": [mask_distance(heads, h) for _, h, _ in older],
             "ffn": [mask_distance(ffn, f) for _, _, f in older]}
        if len(self.history) == self.window and step >= self.min_steps \
                and max(d["heads"]) < self.epsilon and max(d["ffn"]) < self.epsilon:
            return (f"early-bird: the masks of step {step} are within {self.epsilon} of the "
                    f"{self.window - 1} before (heads {max(d['heads']):.3f}, ffn {max(d['ffn']):.3f})"), d
        if step >= self.max_steps:
            return f"fallback: no early-bird ticket by the maximum search length ({self.max_steps} steps)", d
        return None, d
