"""EarlyBERT's ticket drawing and the early-bird rule (see shared/EARLYBERT.md).

Masks are lists with one boolean array per layer (True = kept). Heads are pruned layer-wise
(the k smallest |gate| of every layer), FFN neurons globally (the fraction p of smallest |gate|
across all layers). Selection is top-k on |gate| with a deterministic tie-break: equal values
keep the lower index (and, across layers, the lower layer), so equal gates never prune
everything the way the released code's `> quantile` threshold does. With `ffn_multiple` N > 1
(our extension, not in the paper) each layer's FFN width is rounded to a multiple of N (or the
layer's full size) that GPUs multiply faster, keeping the global count as nearly as possible.

The files the trainer and the monitor exchange (gate snapshots, the ticket) are
pipeline.run_dir's.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction

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


def ffn_masks(gates: list[np.ndarray], fraction: float, multiple: int = 1) -> list[np.ndarray]:
    """Global: the fraction of neurons with the smallest |gate| across all layers is dropped.
    A layer is never emptied: it keeps its largest neuron in place of the next global one.

    multiple > 1 (hardware-friendly widths): every layer's kept width becomes a multiple of
    `multiple` or the layer's full size (a layer smaller than `multiple` is kept whole), and at
    least `multiple`. The global rule's per-layer counts are rounded by the largest-remainder
    method (see `_round_widths`), then each layer keeps its largest |gate| (ties: lower index).
    multiple = 1 returns exactly the global rule's masks."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"--prune_ffn {fraction}: must be in [0, 1)")
    if isinstance(multiple, bool) or int(multiple) != multiple or multiple < 1:
        raise ValueError(f"--ffn_multiple {multiple}: must be an integer >= 1")
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
    masks = [mask[b:e] for b, e in zip(bounds[:-1], bounds[1:])]
    if multiple == 1:
        return masks
    widths = _round_widths([int(m.sum()) for m in masks], sizes, int(multiple))
    return [_keep_largest(flat[b:e], w) for b, e, w in zip(bounds[:-1], bounds[1:], widths)]


def _allowed_widths(size: int, multiple: int) -> list[int]:
    """A layer's permitted kept widths: the multiples of `multiple` up to its size, and its size."""
    return sorted(set(range(multiple, size + 1, multiple)) | {size})


def _round_widths(counts: list[int], sizes: list[int], multiple: int) -> list[int]:
    """Largest-remainder rounding of per-layer counts to permitted widths (`_allowed_widths`).

    Every layer starts at the largest permitted width <= its count (the smallest permitted width
    when its count is below it). Then, by remainder (how far the count lies towards the next
    permitted width) descending, ties to the lower layer, a layer moves up to that next width
    while this brings the total no further from the global count (a tie keeps more neurons). If
    layers raised to their minimum width leave the total above the global count, layers step
    down one permitted width at a time (smallest deviation first, ties to the higher layer) while
    that brings it strictly closer. With all sizes multiples of `multiple` and no layer's count
    below `multiple`, each width is its count rounded down or up to a multiple and the total is
    the multiple nearest the global count (halves round up)."""
    allowed = [_allowed_widths(n, multiple) for n in sizes]
    target = sum(counts)
    widths, up = [], []
    for c, a in zip(counts, allowed):
        below = [w for w in a if w <= c]
        widths.append(below[-1] if below else a[0])
        up.append(min(w for w in a if w >= widths[-1] and w >= c))
    order = sorted((i for i in range(len(counts)) if up[i] > widths[i]),
                   key=lambda i: (-Fraction(counts[i] - widths[i], up[i] - widths[i]), i))
    total = sum(widths)
    for i in order:
        step = up[i] - widths[i]
        if 2 * (target - total) >= step:
            widths[i], total = up[i], total + step
    while total > target:
        moves = [(counts[i] - a[a.index(w) - 1], -i) for i, (w, a) in enumerate(zip(widths, allowed))
                 if a.index(w) > 0 and 2 * (total - target) > w - a[a.index(w) - 1]]
        if not moves:
            break
        i = -min(moves)[1]
        lower = allowed[i][allowed[i].index(widths[i]) - 1]
        total -= widths[i] - lower
        widths[i] = lower
    return widths


def draw_masks(heads: list[np.ndarray], ffn: list[np.ndarray], prune_heads: int | None,
               prune_ffn: float, ffn_multiple: int = 1) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The ticket's masks from |gate| values; prune_heads None: default_prune_heads per layer;
    ffn_multiple: FFN widths in multiples of it (see `ffn_masks`)."""
    k = [default_prune_heads(len(h)) if prune_heads is None else prune_heads for h in heads]
    return head_masks(heads, k), ffn_masks(ffn, prune_ffn, ffn_multiple)


def near_ties(gates: list[np.ndarray], masks: list[np.ndarray], margin: float, pooled: bool = False) -> int:
    """Units whose |gate| lies within `margin` x the spread of all these |gate| values (max - min)
    of the selection boundary (midway between the smallest kept and the largest dropped |gate|):
    a nudge that small moves them across it, so which side they fall on says nothing yet. Adam
    moves every gate by about the LR per step whatever its gradient, so early gates bunch on a
    few values and a mask can look stable while ties decide it. All values equal: every unit of
    a layer with kept and dropped units is a tie.

    The boundary is each layer's (heads; FFN widths rounded per layer), or with `pooled` one for
    all layers (FFN's global rule, --ffn_multiple 1): the global count's threshold."""
    values = [np.abs(np.asarray(g, dtype=np.float64)) for g in gates]
    flat = np.concatenate(values)
    delta = margin * float(flat.max() - flat.min())
    if pooled:
        kept = int(sum(m.sum() for m in masks))
        if kept in (0, len(flat)):
            return 0
        ordered = np.sort(flat)
        boundary = (ordered[len(flat) - kept - 1] + ordered[len(flat) - kept]) / 2
        return int(np.sum(np.abs(flat - boundary) <= delta))
    count = 0
    for v, m in zip(values, masks):
        if m.all() or not m.any():
            continue  # nothing dropped (or kept) in this layer: no boundary to sit on
        boundary = (v[m].min() + v[~m].max()) / 2
        count += int(np.sum(np.abs(v - boundary) <= delta))
    return count


def mask_distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Normalised Hamming distance: the fraction of units on which two masks disagree."""
    x, y = np.concatenate(a), np.concatenate(b)
    if x.shape != y.shape:
        raise ValueError(f"masks of different shapes: {x.shape} vs {y.shape}")
    return float(np.mean(x != y))


@dataclass
class EarlyBirdRule:
    """The ticket has emerged when the newest mask is within `epsilon` of each of the
    `window - 1` older ones, for heads and for FFN alike, at step >= min_steps, and (tie_margin
    > 0) no more than `epsilon` of the newest snapshot's heads or FFN neurons are near-ties of
    its boundary (`near_ties`): a mask that ties decide may look stable and say little. At
    max_steps (None: never) the ticket is drawn regardless (the fallback)."""
    window: int = 5
    epsilon: float = 0.1
    min_steps: int = 100
    max_steps: int | None = 400
    tie_margin: float = 0.0
    ffn_pooled: bool = False  # FFN drawn globally (--ffn_multiple 1): one boundary for all layers
    history: deque = field(default_factory=deque)

    @classmethod
    def for_search(cls, s) -> "EarlyBirdRule":
        """The rule of a search's settings (SearchSettings), as the trainer and the monitor apply
        it; no fallback: at the maximum search length the trainer draws the ticket itself."""
        return cls(window=s.window, epsilon=s.epsilon, min_steps=s.search_min_steps, max_steps=None,
                   tie_margin=s.tie_margin, ffn_pooled=s.ffn_multiple == 1)

    def update(self, step: int, heads: list[np.ndarray], ffn: list[np.ndarray],
               gates: tuple[list[np.ndarray], list[np.ndarray]] | None = None) -> tuple[str | None, dict]:
        """Add one snapshot's masks (drawn from `gates`, its |gate| values, which the near-tie
        count needs); returns (reason the ticket is drawn or None, distances and near-ties: the
        counts in "near_ties", the fractions the rule checks in "ties_heads" and "ties_ffn")."""
        self.history.append((step, heads, ffn))
        while len(self.history) > self.window:
            self.history.popleft()
        older = list(self.history)[:-1]
        d = {"step": step,
             "heads": [mask_distance(heads, h) for _, h, _ in older],
             "ffn": [mask_distance(ffn, f) for _, _, f in older], "near_ties": None,
             "ties_heads": None, "ties_ffn": None}
        if gates is not None:
            d["near_ties"] = (near_ties(gates[0], heads, self.tie_margin),
                              near_ties(gates[1], ffn, self.tie_margin, self.ffn_pooled))
        if self.tie_margin > 0 and gates is not None:
            d["ties_heads"] = d["near_ties"][0] / sum(len(h) for h in heads)
            d["ties_ffn"] = d["near_ties"][1] / sum(len(f) for f in ffn)
        stable = len(self.history) == self.window and step >= self.min_steps \
            and max(d["heads"]) < self.epsilon and max(d["ffn"]) < self.epsilon
        decided = d["ties_heads"] is None or max(d["ties_heads"], d["ties_ffn"]) <= self.epsilon
        if stable and decided:
            ties = "" if d["ties_heads"] is None else \
                f"; near-ties heads {d['ties_heads']:.3f}, ffn {d['ties_ffn']:.3f}"
            return (f"early-bird: the masks of step {step} are within {self.epsilon} of the "
                    f"{self.window - 1} before (heads {max(d['heads']):.3f}, ffn {max(d['ffn']):.3f}{ties})"), d
        if self.max_steps is not None and step >= self.max_steps:
            return f"fallback: no early-bird ticket by the maximum search length ({self.max_steps} steps)", d
        return None, d


def random_masks(like: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Seeded random masks with exactly the per-layer kept counts of `like` (the random-ticket
    baseline: the same shape as the rule's ticket)."""
    rng = np.random.default_rng(seed)
    out = []
    for m in like:
        r = np.zeros(len(m), dtype=bool)
        r[rng.choice(len(m), int(m.sum()), replace=False)] = True
        out.append(r)
    return out
