"""Ticket drawing and the early-bird rule against hand-computed cases."""
import numpy as np
import pytest

from pipeline.earlybird import (EarlyBirdRule, default_prune_heads, ffn_masks, head_masks,
                                mask_distance)


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


def test_rule_fallback_at_the_maximum_search_length():
    rule = EarlyBirdRule(window=5, epsilon=0.1, min_steps=0, max_steps=60)
    for i, step in enumerate((20, 40, 60)):
        reason, _ = rule.update(step, *snapshot({i, i + 1, i + 2, i + 3}, {i}))
    assert reason.startswith("fallback")
