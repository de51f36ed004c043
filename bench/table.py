"""python -m bench.table: the README's results table, generated from bench/results (defense.json, guard.json).

Rewrites the lines between README.md's `<!-- results -->` and `<!-- /results -->` markers; a test checks that the
committed README matches the committed results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
START, END = "<!-- results -->", "<!-- /results -->"


def fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def table(defense: list[dict], guard: list[dict], meta: dict, dataset: str = "cifar10") -> str:
    """One row per attack and rate of `dataset`: ASR without defense, with plain ABL, with the shipped defense and
    the oracle's; clean accuracy without and with the defense; the shipped guard's TPR and FPR."""
    rows = {(r["attack"], r["poison_rate"], r["defense"]): r for r in defense if r["dataset"] == dataset}
    guards = {(r["attack"], r["poison_rate"]): r for r in guard if r["dataset"] == dataset and r["detector"] == "guard"}
    cases = sorted({(a, p) for a, p, _ in rows}, key=lambda c: (c[0], c[1]))
    machine = meta["machine"].split(",")[0]
    lines = [f"{dataset}, `python -m bench.defense` ({meta['wall_seconds'] / 60:.0f} min on {machine}; every row: "
             "bench/results/defense.md, guard.md):", "",
             "| attack | rate | ASR none | ASR abl | ASR full | ASR oracle | CA none | CA full | guard TPR (FPR) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for attack, rate in cases:
        get = {d: rows.get((attack, rate, d), {}) for d in ("none", "abl", "full", "oracle")}
        g = guards.get((attack, rate))
        asr = " | ".join(fmt(get[d].get("asr")) for d in ("none", "abl", "full", "oracle"))
        lines.append(f"| {attack} | {rate:.0%} | {asr}"
                     + f" | {fmt(get['none'].get('clean_accuracy'))} | {fmt(get['full'].get('clean_accuracy'))} | "
                     + (f"{g['tpr']:.3f} ({g['fpr']:.3f})" if g else "-") + " |")
    for attack in ("fgsm", "pgd"):
        g = guards.get((attack, 0.0))
        if g:
            lines.append(f"| {attack.upper()} (adversarial) | - | - | - | - | - | - | - | {g['tpr']:.3f} ({g['fpr']:.3f}) |")
    return "\n".join(lines)


def current_table() -> str:
    read = lambda name: json.loads((RESULTS / name).read_text(encoding="utf-8"))  # noqa: E731
    return table(read("defense.json"), read("guard.json"), read("defense.meta.json"))


def with_table(readme: str, text: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{text}\n{END}{tail}"


def main() -> int:
    README.write_text(with_table(README.read_text(encoding="utf-8"), current_table()), encoding="utf-8")
    print(f"[table] wrote the results table into {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
