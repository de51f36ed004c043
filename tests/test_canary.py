"""Canaries: copies with a secret trigger, planted without changing or losing a user sample, never read by the
defense, and measured by the metrics."""

from __future__ import annotations

import numpy as np
import pytest

from sanitizer.canary import FAMILIES, draw_canaries, plant_canaries
from sanitizer.config import CanaryParams
from sanitizer.data import make_store
from sanitizer.errors import SanitizeError


def user_store(n: int = 200, classes: int = 5):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    return make_store(x, np.arange(n) % classes, [f"u{i}" for i in range(n)], [str(c) for c in range(classes)])


def test_canaries_are_copies_inserted_without_touching_user_samples():
    train = user_store()
    canaries = draw_canaries(CanaryParams(rate=0.05), 7, train.image_shape, 5)
    planted, rows = plant_canaries(train, canaries, 0.05, 7)
    assert [c.family for c in canaries] == list(FAMILIES)
    assert len({c.target for c in canaries}) == len(canaries)  # each its own target
    assert len(rows) == len(canaries) * 10 and len(planted) == len(train) + len(rows)
    users = np.isin(planted.ids, train.ids)
    # The user's samples keep their order, pixels, labels and hashes; the canaries sit among them.
    assert planted.ids[users].tolist() == train.ids.tolist()
    assert np.array_equal(planted.x[users], train.x) and np.array_equal(planted.labels[users], train.labels)
    assert not users[-len(rows):].all()
    position = {i: k for k, i in enumerate(planted.ids)}
    source = {i: k for k, i in enumerate(train.ids)}
    for sample_id, source_id, name, family, target in rows:
        canary = next(c for c in canaries if c.name == name)
        assert family == canary.family and planted.labels[position[sample_id]] == target == canary.target
        assert train.labels[source[source_id]] != target  # copied from another class, relabelled
        assert np.array_equal(planted.x[position[sample_id]], canary.apply(train.x[source[source_id]][None])[0])


def test_the_secret_decides_the_triggers_and_targets():
    shape = (16, 16, 3)
    same = [draw_canaries(CanaryParams(rate=0.03), 11, shape, 10) for _ in range(2)]
    assert all(np.array_equal(a.pattern, b.pattern) and a.target == b.target for a, b in zip(*same))
    other = draw_canaries(CanaryParams(rate=0.03), 12, shape, 10)
    assert any(not np.array_equal(a.pattern, b.pattern) for a, b in zip(same[0], other))
    assert draw_canaries(CanaryParams(rate=0), 11, shape, 10) == []


def test_patch_canary_changes_only_its_patch_and_blend_changes_everything_a_little():
    patch, blend = draw_canaries(CanaryParams(rate=0.03), 5, (32, 32, 3), 10)
    x = np.full((2, 32, 32, 3), 128, dtype=np.uint8)
    changed = (patch.apply(x) != x).any(axis=(0, 3))
    (r, c), s = patch.corner, patch.pattern.shape[0]
    assert s == 4 and not changed[~np.pad(np.ones((s, s), bool), ((r, 32 - r - s), (c, 32 - c - s)))].any()
    diff = np.abs(blend.apply(x).astype(int) - x)
    assert diff.max() <= 26 and (diff > 0).mean() > 0.9


def test_a_user_id_that_takes_a_canarys_name_is_refused():
    train = user_store(50)
    train = make_store(train.x, train.labels, ["canary-1-00000"] + list(train.ids[1:]), train.class_names)
    canaries = draw_canaries(CanaryParams(rate=0.1), 0, train.image_shape, 5)
    with pytest.raises(SanitizeError, match="canary-1-00000.*canary.rate: 0"):
        plant_canaries(train, canaries, 0.1, 0)


def test_a_rate_too_small_for_one_sample_is_refused():
    train = user_store(20)
    canaries = draw_canaries(CanaryParams(rate=0.01), 0, train.image_shape, 5)
    with pytest.raises(SanitizeError, match="canary.rate=0.01 of 20 training samples makes no canary sample"):
        plant_canaries(train, canaries, 0.01, 0)
