"""quarantine: move the isolated suspects out of the training set, with a manifest, one PNG each and a
review page. A reviewer's `review/decisions.csv` can release false positives back to the clean set.

Invariant, checked on every run: ids(clean) + ids(quarantine) = ids(ingested), no overlap, hashes unchanged.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stages import paths
from stages.data import Store, load_store, save_store
from stages.config import Params
from stages.errors import SanitizeError
from stages.fileio import atomic_dir, write_json
from stages.review_page import DETECTOR_COLUMNS, write_review_page

DECISIONS = ("release", "confirm")
DECISION_COLUMNS = ["id", "decision", "note"]
MANIFEST_COLUMNS = ["id", "label", "class_name", "rank", "final_loss", "suspicion", "decision", "quarantined", "note",
                    "sha256", "image"]


def read_decisions(path: Path, suspects: set[str]) -> dict[str, tuple[str, str]]:
    """id -> (decision, note). Every problem names the row and the fix; nothing is guessed."""
    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ("id", "decision") if c not in header]
            if missing:
                raise SanitizeError(f"{path}: missing column(s) {missing}; the header must be {','.join(DECISION_COLUMNS)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise SanitizeError(f"{path}: not a readable UTF-8 CSV ({err}); "
                            f"header must be {','.join(DECISION_COLUMNS)}") from None
    decisions: dict[str, tuple[str, str]] = {}
    for line, row in enumerate(rows, start=2):
        sample_id, decision = (row.get("id") or "").strip(), (row.get("decision") or "").strip().lower()
        if sample_id in decisions:
            raise SanitizeError(f"{path}:{line}: id {sample_id!r} appears twice; keep one row per sample")
        if decision not in DECISIONS:
            raise SanitizeError(f"{path}:{line}: decision {row.get('decision')!r} for {sample_id!r} "
                                f"is not one of {DECISIONS}")
        if sample_id not in suspects:
            raise SanitizeError(f"{path}:{line}: id {sample_id!r} is not among the isolated suspects; "
                                "remove the row (see data/isolate/isolated.csv for the suspects)")
        decisions[sample_id] = (decision, (row.get("note") or "").strip())
    return decisions


def check_partition(ingested: Store, clean: Store, quarantined: Store) -> None:
    """Nothing lost, nothing duplicated, nothing altered. A failure here is a bug, not bad input."""
    clean_ids, q_ids = set(clean.ids), set(quarantined.ids)
    if clean_ids & q_ids:
        raise RuntimeError(f"quarantine invariant: {len(clean_ids & q_ids)} sample(s) both clean and quarantined")
    if clean_ids | q_ids != set(ingested.ids) or len(clean) + len(quarantined) != len(ingested):
        raise RuntimeError("quarantine invariant: clean + quarantine is not the ingested set")
    original = dict(zip(ingested.ids, ingested.sha256))
    for part in (clean, quarantined):
        if any(original[i] != h for i, h in zip(part.ids, part.sha256)):
            raise RuntimeError("quarantine invariant: a sample's hash changed between ingest and quarantine")


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def run(params: Params) -> None:
    store = load_store(paths.TRAIN_STORE)
    isolated = pd.read_csv(paths.ISOLATED_CSV, dtype={"id": str}, keep_default_na=False)
    suspects = set(isolated["id"])
    decisions = read_decisions(paths.DECISIONS_CSV, suspects)
    released = {i for i, (d, _) in decisions.items() if d == "release"}

    position = {sample_id: k for k, sample_id in enumerate(store.ids)}
    in_quarantine = np.zeros(len(store), dtype=bool)
    in_quarantine[[position[i] for i in suspects - released]] = True
    clean, quarantined = store.subset(np.flatnonzero(~in_quarantine)), store.subset(np.flatnonzero(in_quarantine))
    check_partition(store, clean, quarantined)

    scores = pd.read_csv(paths.SCORES_CSV, dtype={"id": str}, keep_default_na=False)
    typical = typical_kept(scores, set(isolated["id"]), set(isolated["label"]))
    detectors = [c for c in DETECTOR_COLUMNS if c in scores.columns]
    evidence = scores.set_index("id")[["suspicion", *detectors]].to_dict("index")
    columns = MANIFEST_COLUMNS[:6] + detectors + MANIFEST_COLUMNS[6:]
    rows = []
    with atomic_dir(paths.QUARANTINE) as out:
        (out / "images").mkdir()
        for k, r in enumerate(isolated.itertuples(index=False)):
            i = position[r.id]
            image = f"images/{k:05d}.png"  # ids may hold any character: file names never come from data
            write_png(out / image, store.x[i])
            decision, note = decisions.get(r.id, ("pending", ""))
            rows.append({"id": r.id, "label": int(store.labels[i]), "class_name": store.class_names[store.labels[i]],
                         "rank": int(r.rank), "final_loss": float(r.final_loss), **evidence[r.id],
                         "decision": decision, "quarantined": int(decision != "release"), "note": note,
                         "sha256": store.sha256[i], "image": image})
        manifest = pd.DataFrame(rows, columns=columns)
        manifest.to_csv(out / paths.QUARANTINE_CSV.name, index=False)
        kept_rows = []
        for k, (sample_id, label) in enumerate(typical):
            image = f"images/kept-{k:04d}.png"
            write_png(out / image, store.x[position[sample_id]])
            kept_rows.append((sample_id, label, image))
        pd.DataFrame(kept_rows, columns=["id", "label", "image"]).to_csv(out / paths.KEPT_CSV.name, index=False)
        save_store(out / paths.QUARANTINE_STORE.name, quarantined)
    with atomic_dir(paths.CLEAN) as out:
        save_store(out / paths.CLEAN_STORE.name, clean)
    summary = {"n_ingested": len(store), "n_clean": len(clean), "n_quarantined": len(quarantined),
               "n_released": len(released), "n_confirmed": sum(d == "confirm" for d, _ in decisions.values())}
    write_json(paths.metrics_file("quarantine"), summary)
    write_review_page(params)
    print(f"[quarantine] {len(quarantined)} quarantined, {len(released)} released, {len(clean)} clean; "
          f"review page: {paths.REVIEW_PAGE}", file=sys.stderr)


def typical_kept(scores: pd.DataFrame, suspects: set, labels: set, per_class: int = 6) -> list[tuple[str, int]]:
    """Kept samples of each suspect class whose final loss is nearest the class median: what a normal
    sample of that class looks like, beside the suspects."""
    out = []
    for label in sorted(labels):
        kept = scores[(scores["label"] == label) & ~scores["id"].isin(suspects)]
        nearest = (kept["final_loss"] - kept["final_loss"].median()).abs().sort_values(kind="stable").index[:per_class]
        out += [(sample_id, int(label)) for sample_id in kept.loc[nearest, "id"]]
    return out
