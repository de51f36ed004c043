"""Settings the pipeline decides from the data itself, so that one params.yaml fits 8x8 digits and photographs.

Each rule reads only the training images (never the red team's truth), is printed by the stage that applies it and
recorded in its metrics (`data_rules`). params.advanced can pin the augmentation by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from sanitizer import paths
from sanitizer.errors import SanitizeError

EASY = 0.8  # nearest-class-mean accuracy above which the data counts as easy (isolation: ABL's share, augmented)
FLIP_KEEPS = 0.9  # flips are on when mirrored images keep this share of a nearest-class-mean classifier's accuracy
FLIP_SAMPLES = 5000  # images the rules score (and as many the class means come from; a subset of larger sets)
PROBE_MAX_POSITIONS = 16 * 16  # the guard's probes read the conv blocks whose maps have at most this many positions


@dataclass(frozen=True)
class DataRules:
    crop_padding: int  # random-crop padding, pixels
    flip: bool  # random horizontal flips
    probe_blocks: int  # conv blocks, counted from the last, whose channel statistics the guard's probes read
    isolation: str  # "adaptive": sized from the loss curves; "share": ABL's fixed share of the lowest losses
    augment_isolation: bool  # random crops (and flips) while training the isolation model

    def as_dict(self) -> dict:
        return asdict(self)


def crop_padding(image_shape: tuple[int, int, int]) -> int:
    """Random crops shift by up to 1/16 of the image side, at least one pixel (CIFAR-10's usual 2 of 32 pixels)."""
    return max(1, min(image_shape[:2]) // 16)


def nearest_mean_accuracies(x: np.ndarray, labels: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """A nearest-class-mean classifier's accuracy on held-out training images and on their mirror images: how easy
    the data is for the simplest model, and how well a horizontal flip keeps images in their class. The class means
    come from one half of the images and are scored on the other, so that an image's own noise never helps it."""
    rng = np.random.default_rng([seed, 0xF11])
    order = rng.permutation(len(x))[:2 * FLIP_SAMPLES]
    fit, held = np.sort(order[::2]), np.sort(order[1::2])
    classes = np.unique(labels[fit])
    flat = x.reshape(len(x), -1)
    means = np.stack([flat[fit][labels[fit] == c].astype(np.float32).mean(0) for c in classes])

    def accuracy(images: np.ndarray) -> float:
        v = images.reshape(len(images), -1).astype(np.float32)
        d = -2 * v @ means.T + (means ** 2).sum(1)[None, :]  # squared distances less |v|^2, without N x K x D
        return float(np.mean(classes[d.argmin(1)] == labels[held]))

    return accuracy(x[held]), accuracy(x[held][:, :, ::-1])


def probe_blocks(image_shape: tuple[int, int, int], n_blocks: int = 6) -> int:
    """The SmallCNN's conv blocks whose maps have at most PROBE_MAX_POSITIONS positions: statistics over larger maps
    cost the guard the most and read the input's pixel noise more than learned features. The model pools after each
    two-block stage while the map is at least 4 pixels wide (sanitizer/models.py)."""
    side, sides = min(image_shape[:2]), []
    for _ in range(n_blocks // 2):
        sides += [side, side]
        if side >= 4:
            side //= 2
    return max(1, sum(s * s <= PROBE_MAX_POSITIONS for s in sides))


def decide(x: np.ndarray, labels: np.ndarray, seed: int, crop: int | None = None,
           flip: bool | None = None) -> tuple[DataRules, dict]:
    """The rules for this training set (`crop` and `flip` pin the augmentation when given) and their evidence.

    - flip: on when mirrored images keep FLIP_KEEPS of the nearest-class-mean accuracy (a mirrored car is a car, a
      mirrored 3 is no 3);
    - isolation, augment_isolation: on easy data (nearest-class-mean accuracy above EASY) the clean samples of the
      backdoor's target class are learned as fast as the poison, so a split of the loss curves takes the whole class:
      isolation takes ABL's fixed share of the lowest losses, from a model trained with augmentation, which slows
      clean samples more than a fixed trigger. On harder data the loss curves separate the poison, and augmentation
      would only slow a fixed trigger that crops and flips move (docs/method.md, "Data rules")."""
    shape = tuple(x.shape[1:])
    plain, mirrored = nearest_mean_accuracies(x, labels, seed)
    kept = mirrored / plain if plain > 0 else 0.0
    rules = DataRules(crop_padding(shape) if crop is None else crop, kept >= FLIP_KEEPS if flip is None else flip,
                      probe_blocks(shape), "share" if plain > EASY else "adaptive", plain > EASY)
    evidence = {"image_shape": list(shape), "nearest_mean_accuracy": round(plain, 4),
                "mirrored_accuracy_kept": round(kept, 4),
                "pinned": [k for k, v in (("crop_padding", crop), ("flip", flip)) if v is not None]}
    return rules, evidence


def load_rules(path=None) -> DataRules:
    """The rules ingest decided for this data (data/ingested/rules.json)."""
    path = path or paths.RULES_JSON
    try:
        return DataRules(**json.loads(path.read_text(encoding="utf-8"))["rules"])
    except FileNotFoundError:
        raise SanitizeError(f"{path}: not found; run the ingest stage first (dvc repro)") from None
    except (ValueError, KeyError, TypeError) as err:
        raise SanitizeError(f"{path}: not a rules file of this project ({err}); re-run `dvc repro`") from None
