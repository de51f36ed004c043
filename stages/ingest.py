"""ingest: read the source, validate every sample with Great Expectations, hash it, and write the canonical tensor
store (data/ingested). With a red team, poison a share of the training set first; then add the canaries; each truth
goes to its own file, which only metrics read. The data rules (sanitizer/rules.py) are decided here, printed and
recorded.
"""

from __future__ import annotations

import sys
from collections import Counter

from sanitizer import paths, runs
from sanitizer.config import Params
from sanitizer.data import save_store, store_hash
from sanitizer.fileio import atomic_dir, write_csv, write_json
from sanitizer.canary import TRUTH_COLUMNS
from sanitizer.ingestion import ingest, redteam_test_set


def run(params: Params) -> None:
    runs.begin("ingest")
    data = ingest(params)
    train, test, calibration, rules, evidence = data.train, data.test, data.calibration, data.rules, data.evidence
    hashes = [store_hash(s) for s in (train, test, calibration)]
    run_id = runs.run_id("ingest", params, [], *hashes)
    with atomic_dir(paths.INGESTED) as out:
        save_store(out / paths.TRAIN_STORE.name, train)
        save_store(out / paths.TEST_STORE.name, test)
        save_store(out / paths.CALIBRATION_STORE.name, calibration)
        data.table.to_csv(out / paths.SAMPLES_CSV.name, index=False)
        if params.redteam.attack:
            save_store(out / paths.REDTEAM_TEST.name, redteam_test_set(test, params))
        write_csv(out / paths.REDTEAM_TRUTH.name, ["id", "original_label", "attack", "target", "role"],
                  data.truth_rows)
        write_csv(out / paths.CANARY_TRUTH.name, TRUTH_COLUMNS, data.canary_rows)
        write_json(out / paths.RULES_JSON.name, {"rules": rules.as_dict(), "evidence": evidence})
        runs.mark(out, run_id)
    counts, class_names = Counter(train.labels.tolist()), list(train.class_names)
    roles = Counter(row[-1] for row in data.truth_rows)
    write_json(paths.metrics_file("ingest"), {
        "run": run_id,
        "n_train": len(train), "n_test": len(test), "n_calibration": len(calibration), "n_classes": len(class_names),
        "image_shape": list(train.image_shape), "data_hash": hashes[0],
        "train_class_counts": {class_names[k]: counts[k] for k in sorted(counts)},
        "validation": data.validation, "notes": data.notes, "data_rules": {**rules.as_dict(), **evidence},
        "redteam_poisoned": roles["backdoor"], "redteam_noise_mode": roles["noise"],
        "redteam_cover": roles["cover"], "canaries": len(data.canary_rows),
    })
    print(f"[ingest] {len(train)} train / {len(test)} test / {len(calibration)} calibration samples, "
          f"{len(class_names)} classes, {len(data.truth_rows)} modified by the red team ({params.redteam.attack}), "
          f"{len(data.canary_rows)} canaries added", file=sys.stderr)
    print(f"[ingest] data rules: isolation {rules.isolation}, {'with' if rules.augment_isolation else 'without'} "
          f"augmentation (nearest-class-mean accuracy {evidence['nearest_mean_accuracy']:.2f}); flips "
          f"{'on' if rules.flip else 'off'} (mirrored images keep {evidence['mirrored_accuracy_kept']:.0%} of it); "
          f"crop padding {rules.crop_padding}; guard probes read the last {rules.probe_blocks} conv blocks",
          file=sys.stderr)
