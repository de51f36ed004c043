"""isolate: ABL stage one. Train the isolation model, score every training sample, choose the suspects.

Reads data/ingested; writes data/isolate (scores.csv, isolated.csv, selection.json), models/isolate.pt, the
isolation plots and metrics/isolate.json. Red-team truth is read only after the choice, for the metrics.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from sanitizer import paths, runs
from sanitizer.config import Params
from sanitizer.data import load_store
from sanitizer.fileio import atomic_dir, write_csv, write_json
from sanitizer.isolation import LOG_FLOOR, isolate, isolation_table, suspicion_score
from sanitizer.metrics import class_shares, isolation_quality, poisoned_ids
from sanitizer.models import save_checkpoint
from sanitizer.plots import isolation_plots
from sanitizer.rules import load_rules
from sanitizer.train import pick_device


def run(params: Params) -> None:
    run_id = runs.run_id("isolate", params, runs.begin("isolate", "ingest"))
    device = pick_device(params.device)
    store = load_store(paths.TRAIN_STORE)
    result = isolate(params, store, load_rules(), device)
    history, isolated, score = result.history, result.isolated, result.score

    rank = np.empty(len(store), dtype=np.int64)
    rank[np.lexsort((store.ids, score))] = np.arange(1, len(store) + 1)
    is_isolated = np.zeros(len(store), dtype=bool)
    is_isolated[isolated] = True
    with atomic_dir(paths.ISOLATE) as out:
        scores = pd.DataFrame(history.round(6), columns=[f"loss_epoch_{e + 1}" for e in range(history.shape[1])])
        scores.insert(0, "id", store.ids)
        scores.insert(1, "label", store.labels)
        scores["final_loss"] = history[:, -1].round(6)
        scores["suspicion"] = (-suspicion_score(history)).round(4)
        for name, values in result.signals.items():  # each detector: higher = more suspicious
            scores[name] = np.round(values, 4)
        if result.report.get("ranked_by") == "fused":
            scores["fused"] = (-score).round(4)
        scores["rank"] = rank
        scores["isolated"] = is_isolated.astype(int)
        scores.to_csv(out / paths.SCORES_CSV.name, index=False)
        isolation_table(result, store).to_csv(out / paths.ISOLATED_CSV.name, index=False)
        write_json(out / paths.SELECTION_JSON.name, result.report)
        runs.mark(out, run_id)
    save_checkpoint(paths.ISOLATE_MODEL, result.model, result.spec, {"seed": params.seed, "run": run_id})

    # Mean loss per epoch of the isolated and the kept samples: the ABL signature, for `dvc plots`.
    write_csv(paths.PLOTS / "isolate_loss.csv", ["epoch", "isolated", "kept"], [
        (e + 1, round(float(history[is_isolated, e].mean()), 6) if is_isolated.any() else "",
         round(float(history[~is_isolated, e].mean()), 6)) for e in range(history.shape[1])])
    if result.report.get("ranked_by") == "fused":
        isolation_plots(history, score, "fused score: minus the mean robust z of loss and detectors", isolated,
                        paths.PLOTS)
    else:
        final = result.report.get("ranked_by") == "final_loss"
        shown = np.log10(score + LOG_FLOOR) if final else score / np.log(10)
        isolation_plots(history, shown, "log10 loss" + (" at the last epoch" if final else
                                                      ", geometric mean over the isolation epochs"),
                        isolated, paths.PLOTS, lambda v: f"cut: loss {10 ** v:.2g}")
    quality = isolation_quality(store.ids[isolated], poisoned_ids())  # metrics only: the choice never saw it
    write_json(paths.metrics_file("isolate"), {"run": run_id, "device": device.type, "selection": result.report,
                                                "n_isolated": int(len(isolated)),
                                                "isolated": class_shares(store.labels[isolated], store.class_names),
                                                **quality, "detectors": list(result.signals), **result.seconds})
    print(f"[isolate] isolated {len(isolated)} of {len(store)} samples ({result.report['rule']}); "
          + ", ".join(f"{k}={v}" for k, v in quality.items()), file=sys.stderr)
