"""The quarantine: every sample that leaves training, whatever flagged it, with its signal and score.

Isolation's suspects and the second look's flags are merged into one manifest; a reviewer's decisions
(`review/decisions.csv`) release false positives back to the clean set or confirm them. Invariant, checked on every
run: ids(clean) + ids(quarantine) = ids(ingested), no overlap, hashes unchanged.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from sanitizer.data import Store
from sanitizer.paths import SUSPECT_COLUMNS
from sanitizer.errors import SanitizeError
from sanitizer.untrusted import control_character, from_csv_text, read_regular

DECISIONS = ("release", "confirm")
DECISION_COLUMNS = ["id", "decision", "note"]
MANIFEST_COLUMNS = ["id", "label", "class_name", "signal", "score", "rank", "final_loss", "suspicion", "decision",
                    "quarantined", "note", "sha256", "image"]


MAX_NOTE = 2000  # characters in a reviewer's note


def note_problem(note: str) -> str | None:
    """Why a reviewer's note cannot be kept (None: it can): it is printed by `review list` and written to CSV."""
    if len(note) > MAX_NOTE:
        return f"is over {MAX_NOTE} characters; shorten it"
    bad = control_character(note)
    return None if bad is None else f"holds a line break or control character ({bad}); give one plain line"


def read_decisions(path: Path, suspects: set[str]) -> dict[str, tuple[str, str]]:
    """id -> (decision, note). Every problem names the row and the fix; nothing is guessed. The file is read only when
    it is a regular file no larger than the suspects' decisions can be, and refused at its first bad row."""
    if not path.exists() and not path.is_symlink():
        return {}
    header_hint = f"the header must be {','.join(DECISION_COLUMNS)}"
    limit = (4096 + len(suspects) * (4 * MAX_NOTE + 1024)) / (1 << 20)  # utf-8 takes at most 4 bytes a character
    data = read_regular(path, limit, f"room for {len(suspects)} suspects' decisions with notes of up to {MAX_NOTE} "
                        "characters", f"pass a decisions.csv ({header_hint})")
    decisions: dict[str, tuple[str, str]] = {}
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), strict=True)  # -sig: Excel's BOM
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in ("id", "decision") if c not in header]
        if missing:
            raise SanitizeError(f"{path}: missing column(s) {missing}; {header_hint}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            cells = dict(zip(header, row))
            sample_id, decision = cells.get("id", "").strip(), cells.get("decision", "").strip().lower()
            note = from_csv_text(cells.get("note", "").strip())
            if len(row) > len(header):
                raise SanitizeError(f"{path}:{line}: {len(row)} cells for {len(header)} columns; quote a note that "
                                    "holds a comma")
            if sample_id in decisions:
                raise SanitizeError(f"{path}:{line}: id {ascii(sample_id)} appears twice; keep one row per sample")
            if decision not in DECISIONS:
                raise SanitizeError(f"{path}:{line}: decision {ascii(cells.get('decision'))[:40]} for "
                                    f"{ascii(sample_id)[:80]} is not one of {DECISIONS}")
            if sample_id not in suspects:
                raise SanitizeError(f"{path}:{line}: id {ascii(sample_id)[:80]} is not among the flagged suspects; "
                                    "remove the row (see data/quarantine/quarantine.csv for the suspects)")
            if note_problem(note):
                raise SanitizeError(f"{path}:{line}: the note for {ascii(sample_id)[:80]} {note_problem(note)}")
            decisions[sample_id] = (decision, note)
    except (UnicodeDecodeError, csv.Error) as err:
        where = f"{path}:{reader.line_num}" if "reader" in locals() else str(path)
        raise SanitizeError(f"{where}: not a readable UTF-8 CSV ({err}; an unclosed quote?); {header_hint}") from None
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


def typical_kept(scores: pd.DataFrame, suspects: set, labels: set, per_class: int = 6) -> list[tuple[str, int]]:
    """Kept samples of each suspect class whose final loss is nearest the class median: what a normal
    sample of that class looks like, beside the suspects."""
    out = []
    for label in sorted(labels):
        kept = scores[(scores["label"] == label) & ~scores["id"].isin(suspects)]
        nearest = (kept["final_loss"] - kept["final_loss"].median()).abs().sort_values(kind="stable").index[:per_class]
        out += [(sample_id, int(label)) for sample_id in kept.loc[nearest, "id"]]
    return out


def merge_suspects(*tables: pd.DataFrame) -> pd.DataFrame:
    """One row per suspect (id, label, signal, score) from each flagging stage's table, in order: a sample flagged by
    two keeps the first stage's row (isolation's), with the other signal named too."""
    rows = pd.concat([t[SUSPECT_COLUMNS] for t in tables], ignore_index=True)
    signals = rows.groupby("id", sort=False)["signal"].agg(lambda s: " + ".join(dict.fromkeys(s)))
    merged = rows.drop_duplicates("id", keep="first").set_index("id")
    merged["signal"] = signals
    return merged.reset_index()


def partition(store: Store, suspects: set[str], released: set[str]) -> tuple[Store, Store]:
    """(clean, quarantined) in ingest order: every suspect not released is quarantined; checked."""
    out = np.isin(store.ids, list(suspects - released))
    clean, quarantined = store.subset(np.flatnonzero(~out)), store.subset(np.flatnonzero(out))
    check_partition(store, clean, quarantined)
    return clean, quarantined
