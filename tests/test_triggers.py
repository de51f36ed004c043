"""The attack library: deterministic, any H x W x C, exact truth, each attack's own labelling rule."""

from __future__ import annotations

import numpy as np
import pytest

from sanitizer.config import RedteamParams
from sanitizer.triggers import TRIGGERS, poison, wanet

SHAPES = [(8, 8, 1), (32, 32, 3), (13, 21, 3)]


def images(shape, n=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("attack", sorted(TRIGGERS))
@pytest.mark.parametrize("shape", SHAPES)
def test_trigger_is_deterministic_and_keeps_shape(attack, shape):
    x, p = images(shape), RedteamParams(attack=attack)
    out = TRIGGERS[attack](x, p)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.array_equal(out, TRIGGERS[attack](x.copy(), p))
    assert not np.array_equal(out, x)


@pytest.mark.parametrize("attack", ["badnets", "blend", "wanet"])
def test_dirty_label_attacks_relabel_non_target_samples(attack):
    labels = np.arange(200) % 10
    p = RedteamParams(attack=attack, poison_rate=0.1, target=3)
    x, y, roles = poison(images((8, 8, 1), 200), labels, p, seed=7)
    backdoor = np.array(sorted(i for i, r in roles.items() if r == "backdoor"))
    assert len(backdoor) == 20 and (labels[backdoor] != 3).all() and (y[backdoor] == 3).all()
    untouched = np.setdiff1d(np.arange(200), list(roles))
    assert (y[untouched] == labels[untouched]).all()
    again = poison(images((8, 8, 1), 200), labels, p, seed=7)
    assert again[2] == roles and np.array_equal(again[0], x)
    assert poison(images((8, 8, 1), 200), labels, p, seed=8)[2] != roles


def test_sig_is_clean_label_on_the_target_class_only():
    labels = np.arange(200) % 10
    p = RedteamParams(attack="sig", poison_rate=0.5, target=3)  # asks for 100, the class has 20
    x0 = images((32, 32, 3), 200)
    x, y, roles = poison(x0, labels, p, seed=0)
    index = np.array(sorted(roles))
    assert len(index) == 20 and (labels[index] == 3).all()
    assert np.array_equal(y, labels)
    changed = np.flatnonzero((x != x0).reshape(200, -1).any(axis=1))
    assert np.array_equal(changed, index)


def test_wanet_adds_noise_mode_samples_with_their_labels_and_is_subtle():
    labels = np.arange(300) % 10
    p = RedteamParams(attack="wanet", poison_rate=0.1, target=0)
    x0 = images((32, 32, 3), 300)
    x, y, roles = poison(x0, labels, p, seed=1)
    noise = [i for i, r in roles.items() if r == "noise"]
    assert len(noise) == 2 * 30  # wanet_cross_ratio 2
    assert np.array_equal(y[noise], labels[noise])
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (32, 1))
    smooth = np.repeat(smooth[None, :, :, None], 3, axis=3).astype(np.uint8)
    diff = np.abs(wanet(smooth, p).astype(int) - smooth.astype(int))
    assert 0 < diff.mean() < 4  # a fraction of a pixel's displacement: near invisible
