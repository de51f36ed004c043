"""quarantine: every flagged sample leaves the training set, into a manifest with its signal and score, one PNG
each and the review page; `review/decisions.csv` releases false positives back or confirms them.

Reads data/ingested, data/isolate, data/recheck and review/decisions.csv; writes data/quarantine and data/clean
(the released model's training set, and the cleaned data to take away: cleaned.npz, or kept_paths.txt for an
image folder, which never hold a canary) and metrics/quarantine.json.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

from sanitizer import paths, runs
from sanitizer.config import Params
from sanitizer.data import load_store, save_arrays, save_store, write_png
from sanitizer.fileio import atomic_dir, write_json, write_text
from sanitizer.metrics import canary_ids
from sanitizer.quarantine import MANIFEST_COLUMNS, merge_suspects, partition, read_decisions, typical_kept
from sanitizer.review_page import DETECTOR_COLUMNS, write_review_page
from sanitizer.untrusted import csv_text


def run(params: Params) -> None:
    inputs = runs.begin("quarantine", "ingest", "isolate", "recheck")
    store = load_store(paths.TRAIN_STORE)
    read = dict(dtype={"id": str}, keep_default_na=False)
    suspects = merge_suspects(pd.read_csv(paths.ISOLATED_CSV, **read), pd.read_csv(paths.FLAGGED_CSV, **read))
    decisions = read_decisions(paths.DECISIONS_CSV, set(suspects["id"]))
    run_id = runs.run_id("quarantine", params, inputs, json.dumps(sorted(decisions.items())))
    released = {i for i, (d, _) in decisions.items() if d == "release"}
    clean, quarantined = partition(store, set(suspects["id"]), released)

    scores = pd.read_csv(paths.SCORES_CSV, **read).set_index("id")
    detectors = [c for c in DETECTOR_COLUMNS if c in scores.columns]
    position = {sample_id: k for k, sample_id in enumerate(store.ids)}
    columns = MANIFEST_COLUMNS[:8] + detectors + MANIFEST_COLUMNS[8:]
    rows = []
    with atomic_dir(paths.QUARANTINE) as out:
        (out / "images").mkdir()
        for k, r in enumerate(suspects.itertuples(index=False)):
            i = position[r.id]
            image = f"images/{k:05d}.png"  # ids may hold any character: file names never come from data
            write_png(out / image, store.x[i])
            decision, note = decisions.get(r.id, ("pending", ""))
            evidence = scores.loc[r.id]
            rows.append({"id": r.id, "label": int(store.labels[i]), "class_name": store.class_names[store.labels[i]],
                         "signal": r.signal, "score": float(r.score), "rank": int(evidence["rank"]),
                         "final_loss": float(evidence["final_loss"]), "suspicion": float(evidence["suspicion"]),
                         **{d: float(evidence[d]) for d in detectors},
                         "decision": decision, "quarantined": int(decision != "release"), "note": csv_text(note),
                         "sha256": store.sha256[i], "image": image})
        pd.DataFrame(rows, columns=columns).to_csv(out / paths.QUARANTINE_CSV.name, index=False)
        kept_rows = []
        for k, (sample_id, label) in enumerate(typical_kept(scores.reset_index(), set(suspects["id"]),
                                                            set(suspects["label"]))):
            image = f"images/kept-{k:04d}.png"
            write_png(out / image, store.x[position[sample_id]])
            kept_rows.append((sample_id, label, image))
        pd.DataFrame(kept_rows, columns=["id", "label", "image"]).to_csv(out / paths.KEPT_CSV.name, index=False)
        save_store(out / paths.QUARANTINE_STORE.name, quarantined)
        runs.mark(out, run_id)
    canaries = canary_ids()  # the accounting and the user's cleaned data leave them out; no choice above read them
    users = clean.subset(np.flatnonzero(~np.isin(clean.ids, list(canaries))))
    with atomic_dir(paths.CLEAN) as out:
        save_store(out / paths.CLEAN_STORE.name, clean)
        # The cleaned set in the source's own terms, without canaries: the kept files of an image folder, else arrays
        # as npz reads them.
        if params.data.source == "imagefolder":
            write_text(out / paths.KEPT_PATHS.name, "".join(f"{i}\n" for i in users.ids))
        else:
            save_arrays(out / paths.CLEAN_ARRAYS.name, users)
        runs.mark(out, run_id)
    by_signal = suspects.loc[~suspects["id"].isin(released), "signal"].value_counts().to_dict()
    # n_ingested = n_clean + n_quarantined, each counting canaries; n_canaries = n_canaries_clean + ..._quarantined.
    summary = {"run": run_id, "n_ingested": len(store), "n_clean": len(clean), "n_quarantined": len(quarantined),
               "n_canaries": len(canaries), "n_canaries_clean": len(clean) - len(users),
               "n_canaries_quarantined": len(canaries) - (len(clean) - len(users)), "n_cleaned_data": len(users),
               "n_released": len(released), "n_confirmed": sum(d == "confirm" for d, _ in decisions.values()),
               "quarantined_by_signal": {str(k): int(v) for k, v in by_signal.items()}}
    write_json(paths.metrics_file("quarantine"), summary)
    write_review_page(params)
    signals = ", ".join(f"{v} by {k}" for k, v in by_signal.items()) or "none"
    print(f"[quarantine] {len(quarantined)} quarantined ({signals}), "
          f"{len(released)} released, {len(clean)} clean; review page: {paths.REVIEW_PAGE}", file=sys.stderr)
