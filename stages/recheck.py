"""recheck: the second look. When isolation found no evidence, train a model afresh on the kept set and look again.

Reads data/ingested, data/isolate and models/isolate.pt (for the model's shape); writes data/recheck (flagged.csv:
the samples it flags, with signal and score; report.json; curve.csv), models/recheck.pt and metrics/recheck.json.
When isolation found evidence (or the defense is plain ABL or off) nothing runs and the outputs say so.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd

from sanitizer import paths, runs
from sanitizer.config import Params
from sanitizer.data import load_store
from sanitizer.fileio import atomic_dir, write_csv, write_json
from sanitizer.metrics import asr_watch, isolation_quality, poisoned_ids
from sanitizer.models import load_checkpoint, save_checkpoint, save_empty_checkpoint
from sanitizer.recheck import flagged_table, second_look, second_look_runs
from sanitizer.rules import load_rules
from sanitizer.train import pick_device, train_settings
from sanitizer.unlearning import unlearning_for


def run(params: Params) -> None:
    run_id = runs.run_id("recheck", params, runs.begin("recheck", "ingest", "isolate"))
    evidence = json.loads(paths.SELECTION_JSON.read_text(encoding="utf-8")).get("evidence")
    u = unlearning_for(params)
    flagged, curve, report = flagged_table(None, None), [], {"ran": False}
    if second_look_runs(params, evidence):
        device = pick_device(params.device)
        store = load_store(paths.TRAIN_STORE)
        isolated = set(pd.read_csv(paths.ISOLATED_CSV, dtype={"id": str}, keep_default_na=False)["id"])
        kept = store.subset(np.flatnonzero(~np.isin(store.ids, list(isolated))))
        _, ckpt = load_checkpoint(paths.ISOLATE_MODEL, device)
        look = second_look(params, kept, ckpt["spec"], u, train_settings(params, load_rules()), device,
                           asr_watch(device))
        flagged = flagged_table(look, kept)
        curve, report = look.curve, {"ran": True, **look.report}
        save_checkpoint(paths.RECHECK_MODEL, look.model, ckpt["spec"], {"seed": params.seed, "run": run_id})
    else:
        report["reason"] = (f"defense.method: {params.defense.method}" if params.defense.method != "full"
                            else f"isolation found evidence ({evidence})")
        save_empty_checkpoint(paths.RECHECK_MODEL, report["reason"], run_id)
    with atomic_dir(paths.RECHECK) as out:
        flagged.to_csv(out / paths.FLAGGED_CSV.name, index=False)
        write_json(out / paths.RECHECK_JSON.name, report)
        columns = ["phase", "epoch", "loss", "clean_accuracy"] + (["asr"] if curve and "asr" in curve[0] else [])
        write_csv(out / paths.RECHECK_CURVE.name, columns, [[c[k] for k in columns] for c in curve])
        runs.mark(out, run_id)
    quality = isolation_quality(flagged["id"], poisoned_ids()) if len(flagged) else {}
    write_json(paths.metrics_file("recheck"), {"run": run_id, **report, "n_flagged": len(flagged), **quality})
    print(f"[recheck] {'flagged ' + str(len(flagged)) if report['ran'] else 'skipped: ' + report['reason']}"
          + "".join(f", {k}={v}" for k, v in quality.items()), file=sys.stderr)
