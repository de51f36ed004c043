"""Canaries: the pipeline's self-test on the user's own data, model and budget.

Ingest adds copies of a small share of the training samples carrying a secret trigger and a secret target label,
one canary per trigger family, each drawn at random from `canary.seed`; the gate then measures, on the released
model, whether each canary's backdoor survived (its ASR) and how many of its samples the quarantine caught. Copies:
no user sample is changed. Like the red team's truth, which samples are canaries is written to its own file that only
ingest, the metrics and the reports read: the defense never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sanitizer.config import CanaryParams, Params
from sanitizer.data import Store, make_store
from sanitizer.errors import SanitizeError

FAMILIES = ("patch", "blend")  # a local and a global trigger; a warp does not implant at a canary's rate
BLEND_ALPHA = 0.2  # the blended pattern's weight (Chen et al. 2017's default)
ID_PREFIX = "canary-"
TRUTH_COLUMNS = ["id", "source_id", "canary", "family", "target"]  # of `plant_canaries`' rows and canary_truth.csv


@dataclass(frozen=True)
class Canary:
    name: str  # "canary-1", ...: never the family, which the review page need not reveal
    family: str
    target: int
    pattern: np.ndarray  # patch: [s, s, C] uint8; blend: [H, W, C] uint8
    corner: tuple[int, int]  # patch: its top-left pixel

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The trigger on uint8 images N x H x W x C."""
        if self.family == "patch":
            (r, c), s = self.corner, self.pattern.shape[0]
            out = x.copy()
            out[:, r:r + s, c:c + s, :] = self.pattern[None]
            return out
        mixed = (1 - BLEND_ALPHA) * x.astype(np.float32) + BLEND_ALPHA * self.pattern[None].astype(np.float32)
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def canary_seed(params: Params) -> int:
    return params.canary.seed if params.canary.seed is not None else params.seed


def draw_canaries(p: CanaryParams, seed: int, image_shape: tuple[int, int, int], n_classes: int) -> list[Canary]:
    """One canary per family, each with its own random target (distinct while there are classes enough), pattern and,
    for a patch, position: a side of an eighth of the image (at least 2 pixels), random black-or-white pixels."""
    if p.rate == 0:
        return []
    h, w, c = image_shape
    rng = np.random.default_rng([seed, 0xCA7A2])
    targets = rng.permutation(n_classes)[:len(FAMILIES)] if n_classes >= len(FAMILIES) else \
        rng.integers(0, n_classes, len(FAMILIES))
    out = []
    for k, (family, target) in enumerate(zip(FAMILIES, targets), start=1):
        if family == "patch":
            s = min(max(2, round(min(h, w) / 8)), h, w)
            pattern = rng.integers(0, 2, size=(s, s, c), dtype=np.uint8) * 255
            corner = (int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1)))
        else:
            pattern, corner = rng.integers(0, 256, size=(h, w, c), dtype=np.uint8), (0, 0)
        out.append(Canary(f"{ID_PREFIX}{k}", family, int(target), pattern, corner))
    return out


def plant_canaries(train: Store, canaries: list[Canary], rate: float, seed: int) -> tuple[Store, list[tuple]]:
    """The training set with round(rate * N) triggered, relabelled copies per canary (sources drawn from the other
    classes) inserted at random places; the user's samples keep their order. Returns it and the truth rows
    (TRUTH_COLUMNS)."""
    rng = np.random.default_rng([seed, 0xCA7A3])
    n = int(round(rate * len(train)))
    if canaries and n == 0:
        raise SanitizeError(f"canary.rate={rate} of {len(train)} training samples makes no canary sample; raise "
                            f"canary.rate to at least {0.5 / max(len(train), 1):.2g} or set it to 0")
    xs, labels, ids, rows = [], [], [], []
    for canary in canaries:
        candidates = np.flatnonzero(train.labels != canary.target)
        if not len(candidates):
            raise SanitizeError(f"canary {canary.name}: every training sample has its target label "
                                f"{canary.target}, so none can be copied; set canary.rate: 0")
        source = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
        xs.append(canary.apply(train.x[source]))
        labels.append(np.full(len(source), canary.target, dtype=train.labels.dtype))
        for j, i in enumerate(source):
            ids.append(f"{canary.name}-{j:05d}")
            rows.append((ids[-1], train.ids[i], canary.name, canary.family, canary.target))
    if not ids:
        return train, []
    taken = set(ids) & set(train.ids.tolist())
    if taken:
        raise SanitizeError(f"sample id {sorted(taken)[0]!r} is also a canary's id; rename the sample or set "
                            "canary.rate: 0")
    x_new, y_new = np.concatenate(xs), np.concatenate(labels)
    total = len(train) + len(ids)
    at = np.sort(rng.choice(total, size=len(ids), replace=False))  # the canaries' places in the combined set
    order = np.empty(total, dtype=np.int64)
    is_canary = np.zeros(total, dtype=bool)
    is_canary[at] = True
    order[~is_canary] = np.arange(len(train))
    order[is_canary] = len(train) + rng.permutation(len(ids))
    x = np.concatenate([train.x, x_new])[order]
    y = np.concatenate([train.labels, y_new])[order]
    all_ids = np.concatenate([train.ids.astype(object), np.array(ids, dtype=object)])[order]
    return make_store(x, y, all_ids, train.class_names), rows
