"""The whole defense in memory, through the same functions the stages call with files between them: what bench/
runs, and what a user's own Python code can call: isolate -> recheck -> quarantine -> unlearn, on an ingested store
(sanitizer.ingestion). The guard is built from the result by sanitizer.guard.build_guard, as the export stage does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from sanitizer.config import Params
from sanitizer.data import Store
from sanitizer.isolation import Isolation, choose_suspects, isolation_table, train_isolation
from sanitizer.quarantine import merge_suspects, partition
from sanitizer.recheck import SecondLook, flagged_table, second_look, second_look_runs
from sanitizer.rules import DataRules
from sanitizer.train import train_settings
from sanitizer.unlearning import after_second_look, sanitize, unlearning_for


@dataclass
class Defended:
    model: torch.nn.Module  # the released model (torch)
    isolation: Isolation
    look: SecondLook | None
    suspects: pd.DataFrame  # the quarantine manifest's id, label, signal, score
    clean: Store
    quarantined: Store
    report: dict  # unlearning's
    curve: list


def defend(params: Params, train: Store, rules: DataRules, device: torch.device, isolation: Isolation | None = None,
           watch=None) -> Defended:
    """Isolate, take the second look when isolation found nothing, quarantine every flag (no reviewer: all pending)
    and unlearn. `isolation`: a trained isolation (`train_isolation`) to reuse; its choice is made again here."""
    isolation = choose_suspects(isolation or train_isolation(params, train, rules, device), train, params, rules)
    u, tp = unlearning_for(params), train_settings(params, rules)
    look, kept = None, None
    if second_look_runs(params, isolation.report.get("evidence")):
        kept = train.subset(np.setdiff1d(np.arange(len(train)), isolation.isolated))
        look = second_look(params, kept, isolation.spec, u, tp, device, watch)
    suspects = merge_suspects(isolation_table(isolation, train), flagged_table(look, kept))
    clean, quarantined = partition(train, set(suspects["id"]), set())
    if look is not None:
        model, curve = copy.deepcopy(look.model), list(look.curve)
        manifest = suspects.assign(decision="pending")
        report = after_second_look(model, params, u, tp, train, clean, manifest, look.report, device, curve, watch)
    else:
        model = copy.deepcopy(isolation.model)
        curve, report = sanitize(model, params, u, tp, clean, quarantined, device, isolation.report.get("evidence"),
                                 watch)
    return Defended(model, isolation, look, suspects, clean, quarantined, report, curve)
