"""Attack triggers: red-team simulation (ingest) and attack success rate (gate).

The defense stages never import this module: a defense that knows the attack proves nothing.
Every trigger is a pure function of uint8 images N x H x W x C -> triggered uint8 images.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from stages.config import RedteamParams

# The blend pattern is part of the attack, not of the run: the same params give the same trigger in
# ingest (poisoning) and gate (measuring), whatever the pipeline seed.
BLEND_PATTERN_SEED = 20171215


def badnets(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A checkerboard patch in the bottom-right corner (Gu et al. 2017, BadNets)."""
    size = min(p.patch_size, x.shape[1], x.shape[2])
    checker = (np.indices((size, size)).sum(axis=0) % 2 == 0).astype(np.uint8) * 255
    out = x.copy()
    out[:, -size:, -size:, :] = checker[None, :, :, None]
    return out


def blend(x: np.ndarray, p: RedteamParams) -> np.ndarray:
    """A fixed uniform-noise image blended in with weight alpha (Chen et al. 2017, Blended)."""
    pattern = np.random.default_rng(BLEND_PATTERN_SEED).integers(0, 256, size=x.shape[1:], dtype=np.uint8)
    mixed = (1.0 - p.blend_alpha) * x.astype(np.float32) + p.blend_alpha * pattern.astype(np.float32)
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


TRIGGERS: dict[str, Callable[[np.ndarray, RedteamParams], np.ndarray]] = {"badnets": badnets, "blend": blend}


def apply_trigger(x: np.ndarray, attack: str, p: RedteamParams) -> np.ndarray:
    return TRIGGERS[attack](x, p)


def choose_poison(labels: np.ndarray, p: RedteamParams, seed: int) -> np.ndarray:
    """Indices to poison: round(rate * N) samples drawn from the non-target classes (all-to-one attack)."""
    candidates = np.flatnonzero(labels != p.target)
    n = min(int(round(p.poison_rate * len(labels))), len(candidates))
    rng = np.random.default_rng([seed, 0xBAD])
    return np.sort(rng.choice(candidates, size=n, replace=False))


def poison(x: np.ndarray, labels: np.ndarray, p: RedteamParams, seed: int):
    """Return poisoned copies of (x, labels) and the poisoned indices (the red-team truth)."""
    index = choose_poison(labels, p, seed)
    x, labels = x.copy(), labels.copy()
    if len(index):
        x[index] = apply_trigger(x[index], p.attack, p)
        labels[index] = p.target
    return x, labels, index
