"""The data rules: settings decided from the training images, the same for every stage that reads them."""

from __future__ import annotations

import numpy as np

from sanitizer.rules import EASY, crop_padding, decide, probe_blocks
from sanitizer.sources import read_digits


def test_crop_and_probe_blocks_follow_the_image_size():
    assert [crop_padding((s, s, 3)) for s in (8, 28, 32, 64)] == [1, 1, 2, 4]
    # SmallCNN's six blocks: 8x8 digits 8,8,4,4,2,2 (all read); 32x32 32,32,16,16,8,8 (the last four)
    assert probe_blocks((8, 8, 1)) == 6 and probe_blocks((32, 32, 3)) == 4 and probe_blocks((64, 64, 3)) == 2


def test_digits_are_easy_and_not_mirror_symmetric():
    src = read_digits(0.2, 0)
    rules, evidence = decide(src.train.x[..., None], src.train.y, 0)
    assert evidence["nearest_mean_accuracy"] > EASY and rules.isolation == "share" and rules.augment_isolation
    assert not rules.flip and evidence["mirrored_accuracy_kept"] < 0.6  # a mirrored 3 is no 3


def test_symmetric_hard_classes_get_flips_and_the_adaptive_selection():
    rng = np.random.default_rng(0)
    n, side = 600, 16
    labels = np.arange(n) % 3
    # Class c: a left-right symmetric blob whose width depends on c, buried in strong noise (hard to tell apart).
    cols = np.abs(np.arange(side) - (side - 1) / 2)
    base = np.stack([np.tile(6.0 * (cols < 2 + 2 * c), (side, 1)) for c in range(3)])
    x = np.clip(base[labels] + rng.normal(128, 60, (n, side, side)), 0, 255).astype(np.uint8)[..., None]
    rules, evidence = decide(x, labels, 0)
    assert evidence["nearest_mean_accuracy"] <= EASY and rules.isolation == "adaptive" and not rules.augment_isolation
    assert rules.flip and evidence["mirrored_accuracy_kept"] >= 0.9
    pinned, evidence = decide(x, labels, 0, crop=0, flip=False)
    assert pinned.crop_padding == 0 and not pinned.flip and evidence["pinned"] == ["crop_padding", "flip"]
