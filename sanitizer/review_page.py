"""The quarantine review page, data/quarantine/index.html: one self-contained file beside the PNGs.

It loads nothing from the network: the Content-Security-Policy allows images from its own folder tree,
inline styles, and exactly one inline script, named by its sha256. Without JavaScript it is a static,
sorted grid; with it, a keyboard review (arrows, r, c, u) kept in browser storage and exported as the
`review/decisions.csv` the pipeline reads. Every string from the data goes through `html.escape` into
the markup, and the script reads it back through `dataset`/`textContent`, never `innerHTML`.

Written twice per run: by quarantine (no gate verdict yet) and by gate (with its verdict and figures).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from sanitizer import paths
from sanitizer.config import Params
from sanitizer.fileio import write_text
from sanitizer.metrics import canary_ids

STYLE = """
:root{--red:#c0392b;--green:#1e8449;--blue:#2c7fb8;--grey:#777}
body{font:14px system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header,main,section{padding:0 1.5rem}
h1{font-size:1.4rem;margin:1rem 0 .3rem} h2{font-size:1.1rem;margin:1.2rem 0 .4rem}
.verdict{display:inline-block;padding:.1rem .5rem;border-radius:4px;color:#fff;font-weight:600}
.verdict.pass{background:var(--green)} .verdict.fail{background:var(--red)} .verdict.none{background:var(--grey)}
.counts{display:flex;gap:.6rem;flex-wrap:wrap;margin:.6rem 0}
.counts div{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.3rem .7rem;text-align:center}
.counts b{display:block;font-size:1.2rem}
table{border-collapse:collapse;background:#fff} td,th{padding:.15rem .6rem;border-bottom:1px solid #e3e3e3;text-align:left}
.bar{background:var(--red);height:.7rem;display:inline-block;vertical-align:middle}
.plots img{max-width:32rem;width:100%;border:1px solid #ddd;background:#fff;margin:0 .5rem .5rem 0}
.strip{display:flex;gap:.4rem;align-items:center;flex-wrap:wrap;margin:.2rem 0}
.strip img{width:48px;height:48px;image-rendering:pixelated;background:#000}
.strip img.trigger{width:96px;height:96px;outline:2px solid #b00}
.canary{color:#805b00}
.toolbar{position:sticky;top:0;z-index:2;background:#fafafa;border-bottom:1px solid #ddd;padding:.5rem 1.5rem;
 display:none;gap:1rem;align-items:center;flex-wrap:wrap}
.js .toolbar{display:flex} .js-only{display:none} .js .js-only{display:inline-block}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 .25rem;background:#fff;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(170px,1fr));gap:.7rem;margin:1rem 0 3rem}
#more{display:none;margin:0 0 3rem} .js #more:not([hidden]){display:inline-block}
.card{background:#fff;border:2px solid #ccc;border-radius:6px;padding:.45rem;font-size:12px;overflow-wrap:anywhere;
 content-visibility:auto;contain-intrinsic-size:170px 250px;outline:none}
.card img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:0 auto .3rem;background:#000}
.card .id{font-weight:600}
.card[data-state=release]{border-color:var(--green);background:#eef8f0}
.card[data-state=confirm]{border-color:var(--red);background:#fbeeee}
.card.current{box-shadow:0 0 0 4px #f1c40f}
.state{font-weight:600;text-transform:uppercase;font-size:11px}
.card[data-state=release] .state{color:var(--green)} .card[data-state=confirm] .state{color:var(--red)}
.spark{width:100%;height:26px;display:block}
.spark .suspect{fill:none;stroke:var(--red);stroke-width:1.5} .spark .kept{fill:none;stroke:#aaa;stroke-width:1}
.card button{font-size:11px;margin-right:.3rem}
.muted{color:var(--grey)}
"""

SCRIPT = r"""
(() => {
  document.documentElement.classList.add('js');
  const grid = document.getElementById('grid');
  // The cards past the first page wait in an inert <template>: parsed, never styled or laid out
  // until shown, so 5,000 suspects load as fast as 200.
  const rest = document.getElementById('rest');
  const cards = [...grid.querySelectorAll('.card'), ...(rest ? rest.content.querySelectorAll('.card') : [])];
  const inGrid = new Set();
  const byId = new Map(cards.map(c => [c.dataset.id, c]));
  const initial = new Map(cards.map(c => [c.dataset.id, c.dataset.decision]));
  const storeKey = 'backdoor-review:' + document.body.dataset.pageKey;
  let changes = {};
  try { changes = JSON.parse(localStorage.getItem(storeKey) || '{}') || {}; } catch (e) { changes = {}; }
  const undo = [];
  const PAGE = Number(document.body.dataset.page);
  let current = null, limit = PAGE;

  const decisionOf = c => changes[c.dataset.id] ?? initial.get(c.dataset.id);
  function paint(c) {
    const d = decisionOf(c);
    if (c.dataset.state === d) return;  // writes to 5,000 cards cost a style pass each
    c.dataset.state = d; c.querySelector('.state').textContent = d;
  }
  function tally() {
    const n = {pending: 0, release: 0, confirm: 0};
    cards.forEach(c => { n[decisionOf(c)] += 1; });
    document.getElementById('tally').textContent =
      `${n.pending} pending, ${n.release} released, ${n.confirm} confirmed (${Object.keys(changes).length} changed here)`;
  }
  function persist() { try { localStorage.setItem(storeKey, JSON.stringify(changes)); } catch (e) { /* private mode */ } }
  function matches(c) {
    const cls = document.getElementById('f-class').value, dec = document.getElementById('f-decision').value;
    return (cls === '' || c.dataset.label === cls) && (dec === '' || c.dataset.state === dec);
  }
  function select(c) {
    if (!c) return;
    if (current) current.classList.remove('current');
    current = c;
    c.classList.add('current');
    c.focus({preventScroll: true});
    c.scrollIntoView({block: 'nearest'});
  }
  function decide(c, d) {
    if (!c) return;
    const id = c.dataset.id;
    undo.push([id, changes[id]]);
    if (d === initial.get(id)) delete changes[id]; else changes[id] = d;
    paint(c); persist(); tally(); applyFilters(false);
  }
  function columns() { return Math.max(1, getComputedStyle(grid).gridTemplateColumns.split(' ').length); }
  function move(step) {
    const list = cards.filter(matches);
    if (!list.length) return;
    const at = current ? list.indexOf(current) : -1;
    const next = Math.min(list.length - 1, Math.max(0, at < 0 ? 0 : at + step));
    if (next >= limit) { limit = next + PAGE; applyFilters(false); }
    select(list[next]);
  }
  // Cards are shown PAGE at a time (5,000 suspects stay fast); moving past the end shows more.
  function applyFilters(reselect = true) {
    const list = cards.filter(matches), shown = list.slice(0, limit);
    const same = shown.length === inGrid.size && shown.every(c => inGrid.has(c));
    if (!same) { grid.replaceChildren(...shown); inGrid.clear(); shown.forEach(c => inGrid.add(c)); }
    const more = document.getElementById('more');
    more.hidden = list.length <= limit;
    more.textContent = `Show more (${shown.length} of ${list.length} shown)`;
    if (reselect && (!current || !inGrid.has(current))) select(shown[0]);
  }
  function csvField(v) { return /[",\r\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  function exportCsv() {
    const lines = ['id,decision,note'];
    cards.forEach(c => {
      const d = decisionOf(c);
      if (d !== 'pending') lines.push([c.dataset.id, d, c.dataset.note].map(csvField).join(','));
    });
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([lines.join('\n') + '\n'], {type: 'text/csv'}));
    a.download = 'decisions.csv';
    document.body.appendChild(a); a.click(); a.remove();
  }

  document.addEventListener('keydown', e => {
    if (e.target.closest && e.target.closest('select, input, textarea') || e.ctrlKey || e.metaKey || e.altKey) return;
    const keys = {ArrowRight: () => move(1), ArrowLeft: () => move(-1), ArrowDown: () => move(columns()),
      ArrowUp: () => move(-columns()), r: () => { decide(current, 'release'); move(1); },
      c: () => { decide(current, 'confirm'); move(1); },
      u: () => { const last = undo.pop(); if (!last) return; const [id, prev] = last;
                 if (prev === undefined) delete changes[id]; else changes[id] = prev;
                 const c = byId.get(id); paint(c); persist(); tally(); applyFilters(false); select(c); }};
    if (keys[e.key]) { e.preventDefault(); keys[e.key](); }
  });
  grid.addEventListener('click', e => {
    const c = e.target.closest('.card'); if (!c) return;
    const b = e.target.closest('button'); if (b) decide(c, b.dataset.decide);
    select(c);
  });
  document.getElementById('f-class').addEventListener('change', () => applyFilters());
  document.getElementById('f-decision').addEventListener('change', () => applyFilters());
  document.getElementById('export').addEventListener('click', exportCsv);
  document.getElementById('more').addEventListener('click', () => { limit += PAGE; applyFilters(false); });
  document.getElementById('reset').addEventListener('click', () => {
    changes = {}; undo.length = 0; persist(); cards.forEach(paint); tally(); applyFilters(false);
  });
  cards.forEach(paint); tally(); applyFilters(false);
  if (cards.length) select(cards[0]);
  window.scrollTo(0, 0);
  document.body.dataset.readyMs = String(Math.round(performance.now()));
  window.reviewReady = true;
})();
"""
PAGE = 200  # cards laid out at a time
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
# 'self' covers the PNGs beside the page and the plots two folders up, from file:// or a server.
CSP = f"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'sha256-{SCRIPT_HASH}'"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def sparkline(losses: np.ndarray, kept: np.ndarray, lo: float, hi: float) -> str:
    """Inline SVG of log-loss per isolation epoch (red) against the kept samples' median (grey)."""
    def points(values: np.ndarray) -> str:
        logs = np.log10(np.asarray(values, dtype=np.float64) + 1e-6)
        xs = np.linspace(0, 100, len(logs)) if len(logs) > 1 else np.array([50.0])
        ys = 24 - 22 * (logs - lo) / max(hi - lo, 1e-9) - 1
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    reference = f"<polyline class='kept' points='{points(kept)}'/>" if np.isfinite(kept).all() and len(kept) else ""
    return (f"<svg class='spark' viewBox='0 0 100 24' preserveAspectRatio='none' role='img' "
            f"aria-label='loss per isolation epoch'>{reference}"
            f"<polyline class='suspect' points='{points(losses)}'/></svg>")


DETECTOR_COLUMNS = ["strip", "mahalanobis", "spectral", "knn_density", "fused"]  # those isolate scored go in the manifest


def detector_line(row) -> str:
    """The detectors' scores (sanitizer/detectors.py, higher = more suspicious) that isolate wrote."""
    shown = [(name, getattr(row, name)) for name in DETECTOR_COLUMNS if pd.notna(getattr(row, name, None))]
    if not shown:
        return ""
    return "<div class='detectors'>" + " &middot; ".join(f"{name} {float(v):.2f}" for name, v in shown) + "</div>"


def card(row, spark: str, canary: bool = False) -> str:
    note = f"<div>note: {_e(row.note)}</div>" if row.note else ""
    if canary:
        note += "<div class='canary'>a canary: a backdoor the pipeline planted to test itself (canary.rate)</div>"
    return (f"<article class='card' tabindex='-1' data-id='{_e(row.id)}' data-label='{int(row.label)}' "
            f"data-decision='{_e(row.decision)}' data-state='{_e(row.decision)}' data-note='{_e(row.note)}'>"
            f"<img src='{_e(row.image)}' alt='suspect {_e(row.id)}' loading='lazy' width='128' height='128'>"
            f"<div><span class='id'>{_e(row.id)}</span> <span class='muted'>loss rank {int(row.rank)}</span></div>"
            f"<div>label {int(row.label)} ({_e(row.class_name)})</div>"
            f"<div class='signal'>flagged by <b>{_e(row.signal)}</b>, score {float(row.score):.3g}</div>"
            f"<div>final loss {float(row.final_loss):.3g} &middot; suspicion {float(row.suspicion):.2f}</div>"
            f"{detector_line(row)}{spark}{note}<div class='state'>{_e(row.decision)}</div>"
            "<div class='js-only'><button type='button' data-decide='release'>release</button>"
            "<button type='button' data-decide='confirm'>confirm</button></div></article>")


def class_table(manifest: pd.DataFrame, class_counts: dict, class_names: list[str]) -> str:
    """Share of each class among suspects against its share of the data: a backdoor shows as one spike."""
    total = sum(class_counts.values()) or 1
    rows = []
    for label, count in manifest["label"].value_counts().items():
        name = class_names[label] if label < len(class_names) else str(label)
        share, base = count / len(manifest), class_counts.get(name, 0) / total
        rows.append(f"<tr><td>{_e(name)}</td><td>{count}</td><td>{share:.0%}</td><td>{base:.0%}</td>"
                    f"<td><span class='bar' style='width:{share * 200:.0f}px'></span></td></tr>")
    return ("<table><tr><th>class</th><th>suspects</th><th>share of suspects</th><th>share of data</th><th></th></tr>"
            + "".join(rows) + "</table>")


def gate_section(gate: Optional[dict]) -> str:
    if gate is None:
        return ("<p><span class='verdict none'>gate not run</span> The gate runs after unlearning and export; "
                "this page is rewritten with its verdict then.</p>")
    verdict = "pass" if gate["passed"] else "fail"
    rows = "".join(f"<tr><td>{_e(c['name'])}</td><td>{_e(c['value'])}</td><td>{_e(c['rule'])} {_e(c['threshold'])}</td>"
                   f"<td>{'pass' if c['passed'] else 'FAIL'}</td></tr>" for c in gate["checks"])
    return (f"<p><span class='verdict {verdict}'>release {'allowed' if gate['passed'] else 'blocked'}</span> "
            f"measured on the exported ONNX model, {gate.get('n_test', '?')} test images.</p>"
            f"<table><tr><th>check</th><th>value</th><th>rule</th><th></th></tr>{rows}</table>")


def scan_section(gate: Optional[dict], manifest: pd.DataFrame, class_names: list[str]) -> str:
    """The residual-backdoor scan's verdict per class; for a flagged class, its reversed trigger beside the suspects
    of that class."""
    scan = (gate or {}).get("scan")
    if not scan:
        return "<p class='muted'>The gate scans the released model (gate.max_scan_anomaly); not run.</p>"
    rows = "".join(f"<tr><td>{_e(c['class_name'])}</td><td>{c['mask_area']:.4f}</td><td>{c['anomaly_index']:.2f}</td>"
                   f"<td>{'-' if c['success'] is None else format(c['success'], '.2f')}</td>"
                   f"<td>{'FLAGGED' if c['flagged'] else ''}</td></tr>"
                   for c in scan["classes"])
    flagged = []
    for c in scan["classes"]:
        if not c["flagged"]:
            continue
        mates = manifest.loc[manifest["label"] == c["class"]].head(12)
        thumbs = "".join(f"<img src='{_e(r.image)}' alt='suspect {_e(r.id)}' title='{_e(r.id)}'>"
                         for r in mates.itertuples(index=False))
        flagged.append(f"<div class='strip'><span>class <b>{_e(c['class_name'])}</b>: reversed trigger</span>"
                       f"<img class='trigger' src='{_e(c['image'])}' alt='reversed trigger of {_e(c['class_name'])}'>"
                       f"<span>{len(mates)} of its suspects:</span>{thumbs or ' none'}</div>")
    verdict = (f"<p><b>{len(scan['flagged'])} class(es) flagged</b> (anomaly index above {scan['threshold']}): "
               "a small trigger sends clean images there, as a backdoor does.</p>" if scan["flagged"] else
               f"<p>No class flagged (anomaly index above {scan['threshold']}).</p>")
    return (verdict + "".join(flagged) + "<table><tr><th>class</th><th>reversed mask area</th><th>anomaly index</th>"
            f"<th>its success on clean test images</th><th></th></tr>{rows}</table>")


def params_line(params: Params) -> str:
    rt = params.redteam
    parts = [f"seed={params.seed}", f"data.source={params.data.source}", f"defense.method={params.defense.method}",
             f"train.isolate_epochs={params.train.isolate_epochs}", f"train.finetune_epochs={params.train.finetune_epochs}"]
    if rt.attack:
        goes = "to the next label" if rt.attack == "all_to_all" else \
            f"to labels {rt.target} and {rt.second_target}" if rt.attack == "multi_target" else f"to label {rt.target}"
        parts.append(f"red-team simulation: {rt.attack} at {rt.poison_rate:.0%} {goes}")
    return ", ".join(parts)


def render_review_page(manifest: pd.DataFrame, scores: pd.DataFrame, kept: pd.DataFrame, summary: dict,
                       class_counts: dict, class_names: list[str], params: Params, gate: Optional[dict],
                       plot_files: list[str], canaries: set[str] = frozenset()) -> str:
    epochs = [c for c in scores.columns if c.startswith("loss_epoch_")]
    kept_median = scores.loc[scores["isolated"] == 0, epochs].median().to_numpy() if len(scores) else np.zeros(0)
    suspects = manifest.merge(scores[["id", *epochs]], on="id", how="left")  # the manifest's order: by signal
    curves = suspects[epochs].to_numpy(dtype=float)
    logs = np.log10(np.r_[curves.ravel(), kept_median] + 1e-6) if len(suspects) else np.zeros(1)
    lo, hi = float(np.nanmin(logs)), float(np.nanmax(logs))
    rendered = [card(r, sparkline(curve, kept_median, lo, hi), r.id in canaries)
                for r, curve in zip(suspects.itertuples(index=False), curves)]
    cards = "".join(rendered[:PAGE])
    rest = f"<template id='rest'>{''.join(rendered[PAGE:])}</template>" if len(rendered) > PAGE else ""
    counts = {"ingested": summary["n_ingested"], "kept for training": summary["n_clean"],
              "quarantined": summary["n_quarantined"], "released": summary["n_released"],
              "confirmed": summary["n_confirmed"], "pending": len(manifest) - summary["n_released"] - summary["n_confirmed"]}
    count_boxes = "".join(f"<div><b>{v}</b>{_e(k)}</div>" for k, v in counts.items())
    if len(manifest):
        top = int(manifest["label"].value_counts().idxmax())
        name = class_names[top]
        share = float((manifest["label"] == top).mean())
        base = class_counts.get(name, 0) / max(sum(class_counts.values()), 1)
        evidence = (f"<p>Class <b>{_e(name)}</b> holds <b>{share:.0%}</b> of the {len(manifest)} suspects against "
                    f"{base:.0%} of the data{': the signature of a backdoor aimed at it' if share > 2 * base else ''}.</p>")
    else:
        evidence = "<p>No samples were isolated.</p>"
    strips = "".join(
        f"<div class='strip'><span>kept <b>{_e(class_names[label])}</b>:</span>"
        + "".join(f"<img src='{_e(k.image)}' alt='kept {_e(k.id)}' title='{_e(k.id)}' loading='lazy'>"
                  for k in group.itertuples(index=False)) + "</div>"
        for label, group in kept.groupby("label"))
    plots = "".join(f"<img src='{_e(p)}' alt='{_e(Path(p).stem)}'>" for p in plot_files)
    class_options = "".join(f"<option value='{int(label)}'>{_e(class_names[label])}</option>"
                            for label in sorted(manifest["label"].unique()))
    page_key = hashlib.sha256("\n".join(f"{i},{d}" for i, d in zip(manifest["id"], manifest["decision"]))
                              .encode()).hexdigest()[:16]
    classes = class_table(manifest, class_counts, class_names) if len(manifest) else ""
    verdict = "" if gate is None else (" &mdash; release allowed" if gate["passed"] else " &mdash; release blocked")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Quarantine review</title><style>{STYLE}</style></head>
<body data-page-key="{page_key}" data-page="{PAGE}">
<header><h1>Quarantine review{verdict}</h1>
<div class="counts">{count_boxes}</div>
{evidence}
<p class="muted">Produced with {_e(params_line(params))}.</p></header>
<section><h2>Gate</h2>{gate_section(gate)}</section>
<section><h2>Residual-backdoor scan of the released model</h2>{scan_section(gate, manifest, class_names)}</section>
<section><h2>Classes among the suspects</h2>{classes}</section>
<section class="plots"><h2>Plots</h2>{plots or '<p class="muted">No plots yet.</p>'}</section>
<section><h2>Typical kept samples of the suspects' classes</h2>{strips or '<p class="muted">None.</p>'}</section>
<div class="toolbar" role="toolbar">
<label>class <select id="f-class"><option value="">all</option>{class_options}</select></label>
<label>decision <select id="f-decision"><option value="">all</option><option>pending</option><option>release</option>
<option>confirm</option></select></label>
<span id="tally"></span>
<button id="export" type="button">Export decisions.csv</button> <button id="reset" type="button">Forget changes</button>
<span class="muted"><kbd>&larr;</kbd><kbd>&rarr;</kbd><kbd>&uarr;</kbd><kbd>&darr;</kbd> move,
<kbd>r</kbd> release, <kbd>c</kbd> confirm, <kbd>u</kbd> undo</span></div>
<main><h2>Suspects, by the signal that flagged them, most suspicious first</h2>
<noscript><p>Without JavaScript the page shows the {min(PAGE, len(manifest))} most suspicious of the
{len(manifest)} suspects (all: <code>python -m stages review list</code>). Record decisions in <code>review/decisions.csv</code> (<code>id,decision,note</code>)
or with <code>python -m stages review release|confirm ID...</code>.</p></noscript>
<p class="muted">Sparklines: the suspect's loss per isolation epoch (red, log scale) against the median kept sample
(grey). Backdoor samples are learned first: their loss falls early and stays low. Decisions made here stay in
this browser until exported; import the file with <code>python -m stages review import decisions.csv</code>,
then run <code>dvc repro</code>.</p>
<div class="grid" id="grid">{cards or ('<p>No samples were isolated (advanced.isolate.ratio is 0 or the data '
                                        'set is tiny).</p>')}</div>{rest}
<button id="more" type="button">Show more</button>
</main>
<script>{SCRIPT}</script>
</body></html>
"""


def write_review_page(params: Params, gate: Optional[dict] = None) -> None:
    """Render data/quarantine/index.html from what the stages wrote: manifest, scores, metrics, plots."""
    read = dict(dtype={"id": str}, keep_default_na=False)
    manifest = pd.read_csv(paths.QUARANTINE_CSV, **read)
    scores = pd.read_csv(paths.SCORES_CSV, **read)
    kept = pd.read_csv(paths.KEPT_CSV, **read)
    summary = json.loads(paths.metrics_file("quarantine").read_text())
    ingest = json.loads(paths.metrics_file("ingest").read_text())
    class_counts = ingest["train_class_counts"]
    class_names = list(class_counts)  # ingest writes them in label order, every class present
    plot_names = ["isolate_loss_distribution.png", "isolate_loss_curves.png"]
    if gate is not None:  # before the gate, unlearn.png may be left from an earlier run
        plot_names.append("unlearn.png")
    plot_files = [f"../../plots/{name}" for name in plot_names if (paths.PLOTS / name).exists()]
    write_text(paths.REVIEW_PAGE, render_review_page(manifest, scores, kept, summary, class_counts, class_names,
                                                     params, gate, plot_files, canary_ids()))
