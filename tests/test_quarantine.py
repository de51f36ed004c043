"""quarantine: nothing is lost, a reviewer can release samples, bad decisions are refused, text is escaped."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from bench.browser import synthetic_page

from stages import quarantine
from sanitizer.config import load_params
from sanitizer.data import load_store
from sanitizer.errors import SanitizeError


@pytest.fixture
def isolated_project(pipeline, project):
    for sub in ("data/ingested", "data/isolate", "data/recheck", "plots"):
        shutil.copytree(pipeline / sub, project / sub)
    for stage in ("ingest", "isolate", "recheck"):  # each stage's outputs, of one run (sanitizer/runs.py)
        (project / "metrics").mkdir(exist_ok=True)
        shutil.copy2(pipeline / f"metrics/{stage}.json", project / f"metrics/{stage}.json")
    (project / "models").mkdir()
    for model in ("isolate.pt", "recheck.pt"):
        shutil.copy2(pipeline / "models" / model, project / "models" / model)
    return project


def ids_of(path):
    return set(load_store(path).ids)


def test_clean_plus_quarantine_is_the_ingested_set(pipeline):
    ingested = load_store(pipeline / "data/ingested/train.npz")
    clean, quar = load_store(pipeline / "data/clean/train.npz"), load_store(pipeline / "data/quarantine/quarantine.npz")
    assert set(clean.ids) | set(quar.ids) == set(ingested.ids)
    assert not set(clean.ids) & set(quar.ids)
    assert len(clean) + len(quar) == len(ingested)
    hashes = dict(zip(ingested.ids, ingested.sha256))
    assert all(hashes[i] == h for store in (clean, quar) for i, h in zip(store.ids, store.sha256))
    manifest = pd.read_csv(pipeline / "data/quarantine/quarantine.csv")
    assert set(manifest.id) == set(quar.ids)
    assert all((pipeline / "data/quarantine" / img).is_file() for img in manifest.image)
    assert (pipeline / "data/quarantine/index.html").is_file()


def test_release_puts_a_sample_back(isolated_project):
    suspect = pd.read_csv("data/isolate/isolated.csv").id.iloc[0]
    other = pd.read_csv("data/isolate/isolated.csv").id.iloc[1]
    (isolated_project / "review/decisions.csv").write_text(
        f"id,decision,note\n{suspect},release,honest sample\n{other},confirm,patch in corner\n")
    quarantine.run(load_params())
    assert suspect in ids_of("data/clean/train.npz")
    assert suspect not in ids_of("data/quarantine/quarantine.npz")
    assert other in ids_of("data/quarantine/quarantine.npz")
    manifest = pd.read_csv("data/quarantine/quarantine.csv").set_index("id")
    assert manifest.loc[suspect, "decision"] == "release" and manifest.loc[suspect, "quarantined"] == 0
    assert manifest.loc[other, "decision"] == "confirm"


@pytest.mark.parametrize("rows, message", [
    ("id,decision,note\nnot-a-sample,release,\n", "not among the flagged suspects"),
    ("id,decision,note\n{s},keep,\n", "is not one of"),
    ("id,decision,note\n{s},release,\n{s},confirm,\n", "appears twice"),
    ("id,note\n{s},x\n", "missing column"),
])
def test_bad_decisions_are_refused_and_nothing_is_written(isolated_project, rows, message):
    suspect = pd.read_csv("data/isolate/isolated.csv").id.iloc[0]
    (isolated_project / "review/decisions.csv").write_text(rows.format(s=suspect))
    with pytest.raises(SanitizeError, match=message):
        quarantine.run(load_params())
    assert not (isolated_project / "data/quarantine").exists()
    assert not (isolated_project / "data/clean").exists()


def test_review_page_escapes_text_from_the_data(tmp_path):
    hostile = "<script>alert(1)</script>"
    page = synthetic_page(tmp_path, 2, [hostile, "ok"], ids=['a"b<img src=x onerror=alert(2)>', "c"])
    html = page.read_text(encoding="utf-8")
    assert html.count("<script>") == 1  # the page's own, allowed by its hash in the CSP
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html and "a&quot;b&lt;img" in html
    assert "Content-Security-Policy" in html and "script-src 'sha256-" in html


def test_the_second_look_s_flags_are_quarantined_with_their_signal_and_reviewable(isolated_project):
    """Every removal goes through the quarantine: a sample the second look flagged is in the manifest with its
    signal and score, out of the cleaned data, and a reviewer can release it."""
    isolated = pd.read_csv("data/isolate/isolated.csv", dtype={"id": str})
    store = load_store("data/ingested/train.npz")
    flagged = [i for i in store.ids if i not in set(isolated.id)][:3]
    pd.DataFrame({"id": flagged, "label": 0, "signal": "recheck:fragility", "score": [3.0, 2.0, 1.0],
                  "round": "first"}).to_csv("data/recheck/flagged.csv", index=False)
    quarantine.run(load_params())
    manifest = pd.read_csv("data/quarantine/quarantine.csv", dtype={"id": str}).set_index("id")
    assert set(flagged) <= set(manifest.index) and set(manifest.loc[flagged, "signal"]) == {"recheck:fragility"}
    assert manifest.loc[flagged, "score"].tolist() == [3.0, 2.0, 1.0]
    assert not set(flagged) & ids_of("data/clean/train.npz") and set(flagged) <= ids_of("data/quarantine/quarantine.npz")
    cleaned = np.load("data/clean/cleaned.npz")  # the cleaned set in the npz source's terms
    assert len(cleaned["x_train"]) == len(load_store("data/clean/train.npz")) and flagged[0] not in cleaned["ids_train"]
    page = (isolated_project / "data/quarantine/index.html").read_text(encoding="utf-8")
    assert "recheck:fragility" in page
    (isolated_project / "review/decisions.csv").write_text(f"id,decision,note\n{flagged[0]},release,clean after all\n")
    quarantine.run(load_params())
    assert flagged[0] in ids_of("data/clean/train.npz") and flagged[1] not in ids_of("data/clean/train.npz")
