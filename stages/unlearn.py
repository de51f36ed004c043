"""unlearn: ABL stage two. The released model: fine-tuned from the isolation model with the suspects unlearned, or,
after the second look, its model with the flags unlearned.

Reads data/ingested, data/isolate/selection.json, data/recheck, data/quarantine and data/clean, models/isolate.pt and
models/recheck.pt; writes models/model.pt, plots/unlearn.csv, plots/unlearn.png and metrics/unlearn.json.
"""

from __future__ import annotations

import json

import pandas as pd

from sanitizer import paths, runs
from sanitizer.config import Params
from sanitizer.data import load_store
from sanitizer.fileio import write_csv, write_json
from sanitizer.metrics import asr_watch
from sanitizer.models import load_checkpoint, save_checkpoint
from sanitizer.plots import unlearn_plot
from sanitizer.rules import load_rules
from sanitizer.train import pick_device, train_settings
from sanitizer.unlearning import after_second_look, sanitize, unlearning_for


def run(params: Params) -> None:
    run_id = runs.run_id("unlearn", params, runs.begin("unlearn", "ingest", "isolate", "recheck", "quarantine"))
    device = pick_device(params.device)
    u, tp = unlearning_for(params), train_settings(params, load_rules())
    clean = load_store(paths.CLEAN_STORE)
    manifest = pd.read_csv(paths.QUARANTINE_CSV, dtype={"id": str}, keep_default_na=False)
    recheck = json.loads(paths.RECHECK_JSON.read_text(encoding="utf-8"))
    watch = asr_watch(device)
    if recheck["ran"]:
        model, ckpt = load_checkpoint(paths.RECHECK_MODEL, device)
        curve = pd.read_csv(paths.RECHECK_CURVE).to_dict("records")
        report = after_second_look(model, params, u, tp, load_store(paths.TRAIN_STORE), clean, manifest, recheck,
                                   device, curve, watch)
    else:
        model, ckpt = load_checkpoint(paths.ISOLATE_MODEL, device)
        evidence = json.loads(paths.SELECTION_JSON.read_text(encoding="utf-8")).get("evidence")
        # the quarantine store holds every suspect the reviewer did not release
        curve, report = sanitize(model, params, u, tp, clean, load_store(paths.QUARANTINE_STORE), device, evidence,
                                 watch)
    save_checkpoint(paths.MODEL, model, ckpt["spec"], {"seed": params.seed, "run": run_id})
    columns = ["phase", "epoch", "loss", "clean_accuracy"] + (["asr"] if curve and "asr" in curve[0] else [])
    write_csv(paths.PLOTS / "unlearn.csv", ["step", *columns],
              [(k + 1, *(round(c[col], 6) if isinstance(c[col], float) else c[col] for col in columns))
               for k, c in enumerate(curve)])
    unlearn_plot(curve, paths.PLOTS / "unlearn.png", held_out=report.get("n_holdout", 0) > 0)
    write_json(paths.metrics_file("unlearn"), {"run": run_id, "device": device.type, "trained_on": len(clean), **report})
