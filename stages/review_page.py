"""The quarantine review page: one self-contained HTML file beside the PNGs, no network, no scripts.

Every string that comes from the data (ids, class names, notes) goes through `html.escape`.
"""

from __future__ import annotations

import html
from collections import Counter

import pandas as pd

from stages.config import Params
from stages.data import Store

CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"
STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem} table{border-collapse:collapse} td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}
.bar{background:#c0392b;height:.8rem;display:inline-block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:.8rem;margin-top:1rem}
.card{border:1px solid #ccc;border-radius:6px;padding:.5rem;font-size:12px;overflow-wrap:anywhere}
.card img{width:128px;height:128px;image-rendering:pixelated;display:block;margin:auto;background:#000}
.release{opacity:.55;border-color:#27ae60} .confirm{border-color:#c0392b}
.tag{font-weight:600}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def class_histogram(manifest: pd.DataFrame, store: Store) -> str:
    """Share of each class among suspects against its share of the data: a backdoor shows as one spike."""
    suspects = Counter(manifest["label"].tolist())
    data = Counter(store.labels.tolist())
    rows = []
    for label, count in suspects.most_common():
        share, base = count / len(manifest), data[label] / len(store)
        rows.append(f"<tr><td>{_e(store.class_names[label])}</td><td>{count}</td><td>{share:.0%}</td>"
                    f"<td>{base:.0%}</td><td><span class='bar' style='width:{share * 200:.0f}px'></span></td></tr>")
    return ("<table><tr><th>class</th><th>suspects</th><th>share of suspects</th><th>share of data</th><th></th></tr>"
            + "".join(rows) + "</table>")


def card(row) -> str:
    return (f"<div class='card {_e(row.decision)}'><img src='{_e(row.image)}' alt='suspect {_e(row.id)}'>"
            f"<div class='tag'>#{int(row.rank)} {_e(row.id)}</div>"
            f"<div>label {int(row.label)} ({_e(row.class_name)})</div>"
            f"<div>final loss {float(row.final_loss):.4g}</div>"
            f"<div>decision: {_e(row.decision)}</div>"
            + (f"<div>note: {_e(row.note)}</div>" if row.note else "") + "</div>")


def render_review_page(manifest: pd.DataFrame, store: Store, summary: dict, params: Params) -> str:
    counts = "".join(f"<tr><th>{_e(k.removeprefix('n_'))}</th><td>{v}</td></tr>" for k, v in summary.items())
    settings = (f"isolate.epochs={params.isolate.epochs}, isolate.gamma={params.isolate.gamma}, "
                f"isolate.ratio={params.isolate.ratio}, seed={params.seed}")
    cards = "".join(card(r) for r in manifest.sort_values("rank").itertuples(index=False))
    body = cards or "<p>No samples were isolated (isolate.ratio is 0 or the data set is tiny).</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>Quarantine review</title><style>{STYLE}</style></head>
<body><h1>Quarantine review</h1>
<p>Suspects isolated by Anti-Backdoor Learning, lowest training loss first ({_e(settings)}).
Decide each in <code>review/decisions.csv</code> (<code>id,decision,note</code>; decision <code>release</code> or
<code>confirm</code>), then run <code>dvc repro</code>.</p>
<table>{counts}</table>
<h2>Classes among the suspects</h2>{class_histogram(manifest, store) if len(manifest) else ''}
<h2>Suspects</h2><div class="grid">{body}</div>
</body></html>
"""
