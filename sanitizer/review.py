"""`python -m stages review`: a reviewer's decisions on the quarantined suspects, in review/decisions.csv.

    summary                      counts, the implicated class, the gate verdict, changes not applied yet
    list [--class C] [--decision D]
    release ID... [--note TEXT]  a false positive: the sample goes back to the training set
    confirm ID... [--note TEXT]  poison: the sample stays out and is unlearned
    reset ID...                  back to pending
    import FILE                  a decisions.csv exported by the review page (replaces the file)

Every edit validates ids and decisions against the quarantine manifest, writes the file atomically, and
writes nothing on any error (exit 2). `dvc repro` then re-runs quarantine and the stages after it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from sanitizer import paths
from sanitizer.errors import SanitizeError
from sanitizer.fileio import write_csv
from sanitizer.quarantine import DECISION_COLUMNS, DECISIONS, note_problem, read_decisions
from sanitizer.untrusted import csv_text

APPLY_HINT = "run `dvc repro` to apply (it re-runs quarantine, unlearn, export and gate)"


def load_manifest() -> pd.DataFrame:
    if not paths.QUARANTINE_CSV.exists():
        raise SanitizeError(f"{paths.QUARANTINE_CSV}: not found; run `dvc repro` first to isolate and quarantine suspects")
    return pd.read_csv(paths.QUARANTINE_CSV, dtype={"id": str}, keep_default_na=False)  # most suspicious first


def save(manifest: pd.DataFrame, decisions: dict[str, tuple[str, str]]) -> None:
    order = {sample_id: k for k, sample_id in enumerate(manifest["id"])}
    rows = sorted(((i, d, csv_text(n)) for i, (d, n) in decisions.items()), key=lambda r: order[r[0]])
    write_csv(paths.DECISIONS_CSV, DECISION_COLUMNS, rows)


def check_ids(ids: list[str], suspects: set[str]) -> None:
    unknown = [i for i in ids if i not in suspects]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise SanitizeError(f"{shown}: not among the {len(suspects)} quarantined suspects; "
                            f"see `python -m stages review list` ({paths.DECISIONS_CSV} unchanged)")


def summary(manifest: pd.DataFrame, decisions: dict) -> None:
    state = [decisions.get(i, ("pending", ""))[0] for i in manifest["id"]]
    counts = pd.Series(state).value_counts().reindex(["pending", *DECISIONS], fill_value=0)
    print(f"{len(manifest)} suspects: " + ", ".join(f"{n} {d}" for d, n in counts.items()))
    if len(manifest):
        by_class = manifest["class_name"].astype(str).value_counts()
        print("by class: " + ", ".join(f"{name} {n} ({n / len(manifest):.0%})" for name, n in by_class.items()))
        by_signal = manifest["signal"].astype(str).value_counts()
        print("flagged by: " + ", ".join(f"{name} {n}" for name, n in by_signal.items()))
    applied = dict(zip(manifest["id"], manifest["decision"]))
    pending_changes = sum(1 for i, s in zip(manifest["id"], state) if applied[i] != s)
    if pending_changes:
        print(f"{pending_changes} decision(s) in {paths.DECISIONS_CSV} not applied yet: {APPLY_HINT}")
    gate_file = paths.metrics_file("gate")
    if gate_file.exists():
        gate = json.loads(gate_file.read_text())
        figures = ", ".join(f"{c['name']}={c['value']}" for c in gate.get("checks", []))
        print(f"gate: {'passed' if gate.get('passed') else 'FAILED'} ({figures})")
    print(f"review page: {paths.REVIEW_PAGE}")


def listing(manifest: pd.DataFrame, decisions: dict, cls: str | None, decision: str | None) -> None:
    rows = manifest
    if cls is not None:
        rows = rows[(rows["class_name"].astype(str) == cls) | (rows["label"].astype(str) == cls)]
    state = {i: decisions.get(i, ("pending", "")) for i in rows["id"]}
    if decision is not None:
        rows = rows[[state[i][0] == decision for i in rows["id"]]]
    print(f"{'id':<24} {'label':<14} {'flagged by':<28} {'score':>9}  decision")
    for r in rows.itertuples(index=False):
        d, note = state[r.id]
        print(f"{r.id:<24} {f'{r.label} ({r.class_name})':<14} {r.signal:<28} {r.score:>9.3g}  {d}"
              + (f"  # {note}" if note else ""))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages review", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = ap.add_subparsers(dest="action", required=True)
    sub.add_parser("summary")
    ls = sub.add_parser("list")
    ls.add_argument("--class", dest="cls", help="class name or label")
    ls.add_argument("--decision", choices=["pending", *DECISIONS])
    for action in (*DECISIONS, "reset"):
        p = sub.add_parser(action)
        p.add_argument("ids", nargs="+", metavar="ID")
        if action != "reset":
            p.add_argument("--note", default="", help="why (kept in the file, shown on the page)")
    imp = sub.add_parser("import")
    imp.add_argument("file", type=Path)
    args = ap.parse_args(argv)

    manifest = load_manifest()
    suspects = set(manifest["id"])
    decisions = read_decisions(paths.DECISIONS_CSV, suspects)
    if args.action == "summary":
        summary(manifest, decisions)
    elif args.action == "list":
        listing(manifest, decisions, args.cls, args.decision)
    elif args.action == "import":
        if not args.file.exists():
            raise SanitizeError(f"{args.file}: not found")
        imported = read_decisions(args.file, suspects)
        changed = sum(1 for i in suspects if decisions.get(i) != imported.get(i))
        save(manifest, imported)
        print(f"imported {len(imported)} decision(s) from {args.file} ({changed} changed) into "
              f"{paths.DECISIONS_CSV}; {APPLY_HINT}")
    else:
        check_ids(args.ids, suspects)
        note = getattr(args, "note", "").strip()
        if note_problem(note):
            raise SanitizeError(f"--note {note_problem(note)} ({paths.DECISIONS_CSV} unchanged)")
        for sample_id in args.ids:
            if args.action == "reset":
                decisions.pop(sample_id, None)
            else:
                decisions[sample_id] = (args.action, note)
        save(manifest, decisions)
        print(f"{args.action}: {len(args.ids)} sample(s) in {paths.DECISIONS_CSV}; {APPLY_HINT}")
    return 0
