"""Ticket drawing and the early-bird rule against hand-computed cases."""
import numpy as np
import pytest

from pipeline.earlybird import (EarlyBirdRule, default_prune_heads, draw_masks, ffn_masks, head_masks,
                                mask_distance, near_ties)


def test_default_head_pruning():
    assert default_prune_heads(12) == 4 and default_prune_heads(16) == 5 and default_prune_heads(2) == 0


def test_head_masks_layerwise_smallest_abs_gates():
    gates = [np.array([0.9, -0.05, 0.3, 0.7]), np.array([0.1, 0.2, -0.8, 0.05])]
    m = head_masks(gates, 2)
    assert m[0].tolist() == [True, False, False, True]  # |-0.05| and 0.3 dropped
    assert m[1].tolist() == [False, True, True, False]  # |-0.8| kept: magnitude, not sign


def test_equal_gates_do_not_prune_everything():
    m = head_masks([np.ones(12)] * 3, 4)
    assert all(x.tolist() == [True] * 8 + [False] * 4 for x in m)  # ties keep lower indices
    f = ffn_masks([np.ones(10), np.ones(10)], 0.3)
    assert sum(x.sum() for x in f) == 14 and f[0].tolist() == [True] * 10


def test_head_prune_out_of_range():
    with pytest.raises(ValueError, match="at least one must stay"):
        head_masks([np.ones(4)], 4)
    with pytest.raises(ValueError, match="prune_ffn"):
        ffn_masks([np.ones(4)], 1.0)


def test_ffn_masks_are_global():
    gates = [np.array([0.5, 0.4, 0.3, 0.2]), np.array([0.9, 0.01, 0.8, 0.02])]
    m = ffn_masks(gates, 0.25)  # drop 2 of 8: 0.01 and 0.02, both in layer 1
    assert m[0].tolist() == [True] * 4 and m[1].tolist() == [True, False, True, False]
    m = ffn_masks([np.array([0.01, 0.02]), np.array([0.9, 0.8, 0.7, 0.6])], 0.5)
    assert m[0].tolist() == [False, True]  # layer 0 keeps its largest, never emptied
    assert m[1].tolist() == [True, True, False, False]


def test_mask_distance():
    a = [np.array([1, 1, 0, 0], bool), np.array([1, 0], bool)]
    b = [np.array([1, 0, 0, 1], bool), np.array([1, 0], bool)]
    assert mask_distance(a, b) == pytest.approx(2 / 6)
    assert mask_distance(a, a) == 0.0


def snapshot(heads_off, ffn_off, n_heads=12, n_ffn=20):
    h = np.ones(n_heads, bool)
    h[list(heads_off)] = False
    f = np.ones(n_ffn, bool)
    f[list(ffn_off)] = False
    return [h], [f]


def test_rule_needs_a_full_window_min_steps_and_both_masks_stable():
    rule = EarlyBirdRule(window=5, epsilon=0.1, min_steps=30, max_steps=400)
    stable = snapshot({0, 1, 2, 3}, {0, 1, 2, 3, 4, 5})
    for step in (10, 20, 30, 40):
        reason, _ = rule.update(step, *stable)
        assert reason is None  # fewer than 5 masks
    reason, d = rule.update(50, *stable)
    assert reason.startswith("early-bird") and d["heads"] == [0.0] * 4

    early = EarlyBirdRule(window=5, epsilon=0.1, min_steps=1000, max_steps=400)
    for step in (10, 20, 30, 40, 50):
        reason, _ = early.update(step, *stable)
    assert reason is None  # stable, but before --min_steps (the step-6 trap)

    drifting = EarlyBirdRule(window=5, epsilon=0.1, min_steps=0)
    for i, step in enumerate((10, 20, 30, 40, 50)):
        # heads stable; FFN moves by 3 of 20 units (0.15 > epsilon) against the oldest masks
        reason, d = drifting.update(step, *snapshot({0, 1, 2, 3}, {i, i + 1, i + 2, 10, 11, 12}))
    assert reason is None and max(d["ffn"]) > 0.1


def test_near_ties_count_units_at_the_selection_boundary():
    # one layer of 10 FFN gates, 3 dropped; spread 1.0, margin 0.05 -> within 0.05 of the boundary
    gates = [np.array([0.0, 0.50, 0.51, 0.52, 0.53, 0.9, 1.0, 0.8, 0.7, 0.6])]
    masks = ffn_masks(gates, 0.3)
    boundary = (0.52 + 0.51) / 2  # the smallest kept, the largest dropped
    assert masks[0].tolist() == [False, False, False, True, True, True, True, True, True, True]
    assert near_ties(gates, masks, 0.05) == sum(abs(g - boundary) <= 0.05 for g in gates[0]) == 4
    assert near_ties(gates, masks, 0.0) == 0
    # every value equal: index order decides the mask, every unit is a tie
    equal = [np.full(8, 0.9)]
    assert near_ties(equal, ffn_masks(equal, 0.3), 0.01) == 8
    # heads: a layer with nothing dropped has no boundary
    assert near_ties([np.array([1.0, 0.5])], [np.array([True, True])], 0.5) == 0
    # FFN drawn globally: one boundary for all layers, where the per-layer ones miss the bunch
    two = [np.array([0.1, 0.3, 0.5, 1.0]), np.array([0.2, 0.49, 0.9, 1.0])]
    masks = ffn_masks(two, 0.5)  # the 4 smallest dropped: 0.1, 0.2, 0.3, 0.49
    assert [m.tolist() for m in masks] == [[False, False, True, True], [False, False, True, True]]
    # spread 0.9, margin 0.054: 0.49 and 0.5 lie around the global boundary 0.495; each layer's
    # own boundary (0.4, 0.695) has no unit that close
    assert near_ties(two, masks, 0.06, pooled=True) == 2 and near_ties(two, masks, 0.06) == 0


def test_rule_waits_while_near_ties_decide_the_masks():
    """Stable masks drawn across a bunch of equal gates (Adam's early steps): no ticket with the
    tie check, one without it; the gates parting lets it fire."""
    heads = [np.array([1.0, 0.9, 0.8, 0.2])]
    bunched = [np.concatenate([np.full(10, 0.5), np.linspace(0.6, 1.0, 10)])]  # 30 % of 20 dropped: in the bunch
    parted = [np.concatenate([np.linspace(0.0, 0.3, 10), np.linspace(0.6, 1.0, 10)])]
    for margin, gates, fires in ((0.01, bunched, False), (0.0, bunched, True), (0.01, parted, True)):
        rule = EarlyBirdRule(window=3, epsilon=0.1, min_steps=0, tie_margin=margin)
        for step in (10, 20, 30):
            h, f = draw_masks(heads, gates, 1, 0.3)
            reason, d = rule.update(step, h, f, (heads, gates))
        assert (reason is not None) == fires, (margin, d)
        if margin:
            assert d["ties_ffn"] == (0.5 if gates is bunched else 0.0) and d["ties_heads"] == 0.0
            assert not fires or "near-ties heads 0.000, ffn 0.000" in reason


def test_rule_fallback_at_the_maximum_search_length():
    rule = EarlyBirdRule(window=5, epsilon=0.1, min_steps=0, max_steps=60)
    for i, step in enumerate((20, 40, 60)):
        reason, _ = rule.update(step, *snapshot({i, i + 1, i + 2, i + 3}, {i}))
    assert reason.startswith("fallback")


# ------------------------------------------------------------------ --ffn_multiple

def _ffn_masks_before_ffn_multiple(gates, fraction):
    """A copy of ffn_masks as it was before `multiple` existed (the reference for multiple=1)."""
    sizes = [len(g) for g in gates]
    flat = np.abs(np.concatenate([np.asarray(g, dtype=np.float64) for g in gates]))
    keep = max(len(flat) - int(round(fraction * len(flat))), len(gates))
    bounds = np.cumsum([0] + sizes)
    order = lambda v: np.lexsort((np.arange(len(v)), -v))  # noqa: E731
    firsts = [b + int(order(flat[b:e])[0]) for b, e in zip(bounds[:-1], bounds[1:])]
    rank = flat.copy()
    rank[firsts] = np.inf
    mask = np.zeros(len(flat), dtype=bool)
    mask[order(rank)[:keep]] = True
    return [mask[b:e] for b, e in zip(bounds[:-1], bounds[1:])]


def test_ffn_multiple_1_is_the_global_rule_unchanged():
    rng = np.random.default_rng(7)
    for trial in range(40):
        sizes = rng.integers(1, 200, size=rng.integers(1, 8))
        # some rounded gates, so that ties occur within and across layers
        gates = [np.round(rng.normal(size=n), 1 if trial % 2 else 6) for n in sizes]
        frac = float(rng.choice([0.0, 0.3, 0.5, 0.9, 0.99]))
        old = _ffn_masks_before_ffn_multiple(gates, frac)
        for new in (ffn_masks(gates, frac), ffn_masks(gates, frac, 1),
                    draw_masks([np.ones(4)] * len(gates), gates, 1, frac)[1],
                    draw_masks([np.ones(4)] * len(gates), gates, 1, frac, ffn_multiple=1)[1]):
            assert [m.tolist() for m in new] == [m.tolist() for m in old]


def test_ffn_multiple_64_on_bert_base():
    rng = np.random.default_rng(0)
    gates = [rng.normal(size=3072) for _ in range(12)]
    masks = ffn_masks(gates, 0.3, 64)
    widths = [int(m.sum()) for m in masks]
    assert all(w % 64 == 0 and 64 <= w <= 3072 for w in widths)
    keep = 36864 - round(0.3 * 36864)
    assert keep == round(0.7 * 36864)
    target = 64 * round(keep / 64)
    assert sum(widths) == target  # the nearest multiple of 64: exact here
    global_counts = [int(m.sum()) for m in ffn_masks(gates, 0.3)]
    assert all(abs(w - c) < 64 for w, c in zip(widths, global_counts))  # rounded down or up
    for g, m, w in zip(gates, masks, widths):  # each layer keeps its largest |gate|
        a = np.abs(g)
        assert a[m].min() > a[~m].max()
    assert [m.tolist() for m in ffn_masks(gates, 0.3, 64)] == [m.tolist() for m in masks]  # deterministic
    heads, ffn = draw_masks([rng.random(12) for _ in range(12)], gates, 4, 0.3, ffn_multiple=64)
    assert [m.tolist() for m in ffn] == [m.tolist() for m in masks] and all(h.sum() == 8 for h in heads)


def test_ffn_multiple_ties_and_tie_break():
    # Equal gates: the global rule keeps [16, 16, 4] (ties to the lower layer); 4 is below the
    # multiple, so that layer is raised to 8; within a layer ties keep the lower indices.
    m = ffn_masks([np.ones(16), np.ones(16), np.ones(16)], 0.25, 8)
    assert [int(x.sum()) for x in m] == [16, 16, 8]
    assert all(x.tolist() == [True] * int(x.sum()) + [False] * (16 - int(x.sum())) for x in m)
    # A total half-way between two multiples rounds up: 36 kept -> 40 at multiple 8.
    m = ffn_masks([np.r_[np.full(36, 2.0), np.full(28, 0.1)]], 28 / 64, 8)
    assert m[0].tolist() == [True] * 40 + [False] * 24
    # Two layers each half a unit past a multiple: the lower layer gets the extra unit.
    gates = [np.r_[np.full(96, 2.0), np.full(160, 0.1)], np.r_[np.full(96, 2.0), np.full(160, 0.1)]]
    assert [int(x.sum()) for x in ffn_masks(gates, 0.625, 64)] == [128, 64]


def test_ffn_multiple_small_and_odd_layers_never_empty():
    rng = np.random.default_rng(3)
    # A layer smaller than the multiple is kept whole; a layer whose size is no multiple may keep
    # its full size; a layer whose neurons all rank last still keeps `multiple` of them.
    gates = [rng.random(40), rng.random(100), np.full(256, 1e-6), rng.random(256) + 1]
    masks = ffn_masks(gates, 0.5, 64)
    widths = [int(m.sum()) for m in masks]
    assert widths[0] == 40
    assert widths[1] in (64, 100) and widths[2] >= 64 and widths[3] % 64 == 0
    assert all(w > 0 for w in widths)
    for trial in range(200):
        n = rng.integers(1, 6)
        sizes = rng.integers(1, 300, size=n)
        gates = [rng.exponential(size=s) * rng.exponential() for s in sizes]
        mult, frac = int(rng.choice([2, 8, 32, 64, 128])), float(rng.choice([0.1, 0.3, 0.6, 0.95]))
        masks = ffn_masks(gates, frac, mult)
        for g, m, s in zip(gates, masks, sizes):
            w = int(m.sum())
            assert len(m) == s and (w == s or (w % mult == 0 and w >= mult)), (sizes, mult, frac)
            assert w >= min(mult, s) > 0
            a = np.abs(g)
            assert w == s or a[m].min() >= a[~m].max()
        if all(s % mult == 0 for s in sizes):  # and no layer's count is below the multiple
            counts = [int(m.sum()) for m in ffn_masks(gates, frac)]
            if min(counts) >= mult:
                total = sum(int(m.sum()) for m in masks)
                assert total == mult * int(np.floor(sum(counts) / mult + 0.5))
                assert all(abs(int(m.sum()) - c) < mult for m, c in zip(masks, counts))


def test_ffn_multiple_out_of_range():
    for bad in (0, -64, 1.5):
        with pytest.raises(ValueError, match="--ffn_multiple"):
            ffn_masks([np.ones(64)], 0.3, bad)
