"""Metrics: the only code that reads red-team or canary truth. The defense never calls it to choose anything."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sanitizer import paths
from sanitizer.canary import TRUTH_COLUMNS, canary_seed, draw_canaries
from sanitizer.triggers import Backdoor


def clean_accuracy(predict, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predict(images) == labels))


def backdoor_asr(predict, images: np.ndarray, labels: np.ndarray, n_classes: int, backdoor) -> float:
    """Share of triggered images (triggers.Backdoor.test_set: label not already the goal) classified as the label the
    backdoor sends them to."""
    triggered, goals, _ = backdoor.test_set(images, labels, n_classes)
    return float(np.mean(predict(triggered) == goals)) if len(goals) else float("nan")


def poisoned_ids() -> set[str] | None:
    """Ids of the samples that carry the red team's trigger and target label (WaNet's noise-mode samples keep their
    labels and are not counted); None without a red team."""
    if not paths.REDTEAM_TRUTH.exists():
        return None
    truth = pd.read_csv(paths.REDTEAM_TRUTH, dtype={"id": str}, keep_default_na=False)
    return set(truth.loc[truth["role"] == "backdoor", "id"])


def canary_truth() -> pd.DataFrame:
    """id, source_id, canary, family, target of every canary ingest planted (empty without canaries)."""
    if not paths.CANARY_TRUTH.exists():
        return pd.DataFrame(columns=TRUTH_COLUMNS)
    return pd.read_csv(paths.CANARY_TRUTH, dtype={"id": str, "source_id": str}, keep_default_na=False)


def canary_ids() -> set[str]:
    """The training set's canaries: for the accounting and the user's cleaned data, never for a choice."""
    return set(canary_truth()["id"])


def canary_results(params, predict, test, quarantined: set[str], flag=None,
                   truth: pd.DataFrame | None = None) -> list[dict]:
    """Per canary: its ASR on `predict` (the released model) over the test images of other classes, the share of its
    samples in `quarantined` (recall) and, given `flag` (images -> bool: the guard), the share of those triggered
    images the guard flags. `truth`: the canaries (canary.TRUTH_COLUMNS); default the file ingest wrote."""

    truth = canary_truth() if truth is None else truth
    out = []
    for c in draw_canaries(params.canary, canary_seed(params), test.image_shape, len(test.class_names)):
        ids = set(truth.loc[truth["canary"] == c.name, "id"])
        caught = len(ids & quarantined)
        row = {"canary": c.name, "family": c.family, "target": c.target, "n": len(ids), "quarantined": caught,
               "recall": round(caught / len(ids), 4) if ids else None,
               "asr": round(backdoor_asr(predict, test.x, test.labels, len(test.class_names),
                                         Backdoor(c.name, c.apply, c.target)), 4)}
        if flag is not None:
            row["guard_tpr"] = round(float(np.mean(flag(c.apply(test.x[test.labels != c.target])))), 4)
        out.append(row)
    return out


def isolation_quality(flagged_ids, poisoned: set[str] | None) -> dict:
    """Precision and recall of a set of flagged ids against the red team's poison (empty without one)."""
    if not poisoned:
        return {}
    flagged = list(flagged_ids)
    hits = sum(1 for i in flagged if i in poisoned)
    return {"isolation_precision": round(hits / len(flagged), 4) if flagged else None,
            "isolation_recall": round(hits / len(poisoned), 4)}


def class_shares(labels: np.ndarray, class_names) -> dict:
    """Per-class share of a set of suspects, and its dominant class."""
    shares = {class_names[c]: round(float(np.mean(labels == c)), 4) for c in np.unique(labels)}
    return {"n": int(len(labels)), "class_share": shares, "dominant_class": max(shares, key=shares.get) if shares else None}


def asr_watch(device):
    """ASR per epoch on the red-team test images that ingest wrote, for the training curves only (None without a red
    team). A metric, like isolation precision: no choice of the defense reads it."""
    import torch

    from sanitizer.data import load_store
    from sanitizer.train import accuracy, to_tensor

    if not paths.REDTEAM_TEST.exists():
        return None
    triggered = load_store(paths.REDTEAM_TEST)
    x, target = to_tensor(triggered.x, device), torch.from_numpy(triggered.labels).to(device)
    return lambda model: {"asr": accuracy(model, x, target)}
