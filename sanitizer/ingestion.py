"""Ingestion: read the source, validate every sample with Great Expectations, plant the red team's poison (a
simulation) and the canaries (the self-test; both truths only the metrics read), split off the calibration images and
decide the data rules."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sanitizer.canary import canary_seed, draw_canaries, plant_canaries
from sanitizer.config import Params
from sanitizer.data import Store, calibration_split, make_store
from sanitizer.errors import SanitizeError
from sanitizer.rules import DataRules, decide
from sanitizer.sources import Source, read_source
from sanitizer.untrusted import check_names

EXAMPLE_IDS = 10  # ids shown per group of identical images
MIN_TRAIN_PER_CLASS = 5  # unlearning's held-out share and the guard's per-class statistics need a few of each


def resolve_class_names(params: Params, source: Source) -> list[str]:
    if params.data.classes:
        return list(params.data.classes)
    if source.class_names:
        return list(source.class_names)
    return [str(i) for i in range(int(max(source.train.y.max(), 0)) + 1)]  # the readers bound labels (MAX_CLASSES)


def sample_table(store: Store, split: str) -> pd.DataFrame:
    """One row per sample: the table Great Expectations validates and samples.csv records."""
    flat = store.x.reshape(len(store), -1)
    h, w, c = store.image_shape
    return pd.DataFrame({
        "id": store.ids, "split": split, "label": store.labels, "height": h, "width": w, "channels": c,
        "min": flat.min(axis=1), "max": flat.max(axis=1), "mean": flat.mean(axis=1).round(3), "sha256": store.sha256,
    })


def _offenders(table: pd.DataFrame, column: str, values) -> list[str]:
    return table.loc[table[column].isin(list(values)), "id"].astype(str).tolist()


def validate(table: pd.DataFrame, class_names: list[str], label_source: str) -> dict:
    """Run the expectation suite; raise SanitizeError naming the offending samples on failure."""
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # GX ignores TQDM_DISABLE
    batch_def = (ctx.data_sources.add_pandas(name="samples").add_dataframe_asset(name="samples")
                 .add_batch_definition_whole_dataframe("all"))
    suite = ctx.suites.add(gx.ExpectationSuite(name="ingest"))
    first = table.iloc[0]
    classes = list(range(len(class_names)))
    fixes = {
        "label": f"labels must be class indices 0..{len(classes) - 1} ({label_source}); fix the labels or set data.classes",
        "height": "all images must share one shape", "width": "all images must share one shape",
        "channels": "all images must share one number of channels",
        "min": "pixels must be 0..255", "max": "pixels must be 0..255",
        "id": "sample ids must be unique",
    }
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes))
    for col in ("height", "width", "channels"):
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[int(first[col])]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="min", min_value=0, max_value=255))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="max", min_value=0, max_value=255))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column="id"))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="sha256"))
    result = batch_def.get_batch(batch_parameters={"dataframe": table}).validate(suite, result_format="COMPLETE")
    for r in result.results:
        if r.success:
            continue
        column = r.expectation_config.kwargs.get("column")
        values = r.result.get("unexpected_list") or []
        ids = _offenders(table, column, set(values)) if column != "id" else sorted(set(map(str, values)))
        shown = ", ".join(f"{i!r}" for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise SanitizeError(
            f"data validation failed ({r.expectation_config.type} on {column!r}): sample(s) {shown} have "
            f"{column}={sorted(set(values), key=str)[:5]}; {fixes.get(column, 'fix the source data')}"
        )
    return {"success": bool(result.success), **{k: int(v) if isinstance(v, (int, np.integer)) else v
                                                 for k, v in result.statistics.items()}}


def duplicate_report(table: pd.DataFrame) -> dict:
    """Identical images are reported, not refused: they may be honest, but across splits they leak."""
    groups = table.groupby("sha256")["id"].apply(list)
    dups = groups[groups.map(len) > 1]
    split_of = dict(zip(table["id"], table["split"]))
    cross = [ids for ids in dups if len({split_of[i] for i in ids}) > 1]
    shown = [ids[:EXAMPLE_IDS] + ([f"... {len(ids) - EXAMPLE_IDS} more"] if len(ids) > EXAMPLE_IDS else [])
             for ids in list(dups)[:5]]  # bounded: a set of identical images must not make a huge report
    for ids in shown[:3]:
        print(f"[ingest] note: identical images {ids}", file=sys.stderr)
    return {"duplicate_groups": int(len(dups)), "duplicate_samples": int(sum(map(len, dups))),
            "train_test_duplicate_groups": len(cross), "examples": shown}


def read_and_validate(params: Params) -> tuple[Store, Store, dict, list[str]]:
    """Read the source and validate it: (train, test, validation report, reader notes), or SanitizeError."""
    source = read_source(params.data.source, params.data.path, params.data.test_size, params.seed,
                         params.advanced.limits)
    class_names = resolve_class_names(params, source)
    label_source = "data.classes" if params.data.classes else ("class names in the source" if source.class_names
                                                               else "inferred from the largest train label")
    check_names(class_names, "class name", f"{label_source}", "rename the class")
    if len(class_names) < 2:
        raise SanitizeError(f"data validation failed: one class ({ascii(class_names[0])}; {label_source}); a backdoor "
                            "defense needs at least 2 classes")
    check_names([*source.train.ids, *source.test.ids], "sample id", params.data.path or params.data.source,
                "rename the file")
    train = make_store(source.train.x, source.train.y, source.train.ids, class_names)
    test = make_store(source.test.x, source.test.y, source.test.ids, class_names)
    table = pd.concat([sample_table(train, "train"), sample_table(test, "test")], ignore_index=True)
    validation = validate(table, class_names, label_source)
    missing = sorted(set(range(len(class_names))) - set(train.labels.tolist()))
    if missing:
        raise SanitizeError(f"data validation failed: class(es) {[class_names[i] for i in missing]} have no training "
                            f"samples; add samples or fix the class list ({label_source})")
    counts = np.bincount(train.labels, minlength=len(class_names))
    if counts.min() < MIN_TRAIN_PER_CLASS:
        c = int(counts.argmin())
        raise SanitizeError(f"data validation failed: class {ascii(class_names[c])} has {counts[c]} training sample(s); "
                            f"isolation, unlearning and the guard need at least {MIN_TRAIN_PER_CLASS} a class")
    return train, test, {**validation, "duplicates": duplicate_report(table)}, source.notes


def redteam_test_set(test: Store, params: Params) -> Store:
    """Every backdoor's triggered test images, labelled as where it sends them (triggers.Backdoor.test_set): accuracy on
    this set is the ASR. Written for metrics (the unlearning curve); the defense never reads it."""
    from sanitizer.triggers import backdoors

    parts = [(door,) + door.test_set(test.x, test.labels, len(test.class_names))
             for door in backdoors(params.redteam)]
    ids = [test.ids[keep] if len(parts) == 1 else np.char.add(f"{door.name}:", test.ids[keep].astype(str))
           for door, _, _, keep in parts]
    return make_store(np.concatenate([x for _, x, _, _ in parts]), np.concatenate([g for _, _, g, _ in parts]),
                      np.concatenate(ids), test.class_names)


@dataclass
class Ingested:
    train: Store  # poisoned by the red team, when there is one
    test: Store
    calibration: Store  # held out of the test split: the guard's threshold, never trained on nor scored
    table: pd.DataFrame  # the per-sample table that was validated
    validation: dict
    notes: list[str]
    truth_rows: list[tuple]  # (id, original label, attack, target, role) of every sample the red team touched
    canary_rows: list[tuple]  # (id, source id, canary, family, target) of every canary (sanitizer/canary.py)
    rules: DataRules
    evidence: dict  # what the rules read


def ingest(params: Params) -> Ingested:
    train, test, validation, notes = read_and_validate(params)
    class_names = list(train.class_names)
    rt = params.redteam
    for key in ("target", "second_target") if rt.attack == "multi_target" else ("target",) if rt.attack else ():
        if getattr(rt, key) >= len(class_names):
            raise SanitizeError(f"params.yaml: redteam.{key}={getattr(rt, key)} is not a class index "
                                f"(0..{len(class_names) - 1})")
    truth_rows = []
    if rt.attack and rt.poison_rate > 0:
        from sanitizer.triggers import poison  # red-team simulation only; the defense never sees this

        x, labels, touched = poison(train.x, train.labels, rt, params.seed)
        truth_rows = [(train.ids[i], int(train.labels[i]), t.backdoor, t.target, t.role)
                      for i, t in sorted(touched.items())]
        train = make_store(x, labels, train.ids, class_names)
    seed = canary_seed(params)
    canaries = draw_canaries(params.canary, seed, train.image_shape, len(class_names))
    train, canary_rows = plant_canaries(train, canaries, params.canary.rate, seed)
    table = pd.concat([sample_table(train, "train"), sample_table(test, "test")], ignore_index=True)
    # Validated as one test split, then split: the guard is calibrated on data no stage trains on and the gate does
    # not score.
    kept, held = calibration_split(test.labels, params.data.calibration_size, params.seed)
    if not len(kept) or not len(held):
        raise SanitizeError(f"params.yaml: data.calibration_size={params.data.calibration_size} leaves "
                            f"{len(kept)} of the {len(test)} test images to score and {len(held)} to calibrate the "
                            "guard; choose a share that leaves both, or add test images")
    adv = params.advanced.train
    rules, evidence = decide(train.x, train.labels, params.seed, adv.crop_padding, adv.flip)
    return Ingested(train, test.subset(kept), test.subset(held), table, validation, notes, truth_rows, canary_rows,
                    rules, evidence)
