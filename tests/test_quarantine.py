"""quarantine: nothing is lost, a reviewer can release samples, bad decisions are refused, text is escaped."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from stages import quarantine
from stages.config import load_params
from stages.data import load_store, make_store
from stages.errors import SanitizeError
from stages.review_page import render_review_page


@pytest.fixture
def isolated_project(pipeline, project):
    for sub in ("data/ingested", "data/isolate"):
        shutil.copytree(pipeline / sub, project / sub)
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
    ("id,decision,note\nnot-a-sample,release,\n", "not among the isolated suspects"),
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


def test_review_page_escapes_text_from_the_data():
    hostile = "<script>alert(1)</script>"
    store = make_store(np.zeros((2, 8, 8, 1), np.uint8), [0, 1], ['a"b', "c"], [hostile, "ok"])
    manifest = pd.DataFrame([{"id": 'a"b<img src=x onerror=alert(2)>', "label": 0, "class_name": hostile, "rank": 1,
                              "final_loss": 0.0, "decision": "pending", "quarantined": 1, "note": "<b>n</b>",
                              "sha256": "0", "image": "images/00000.png"}])
    page = render_review_page(manifest, store, {"n_ingested": 2}, load_params_default())
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img src=x" not in page and "<b>n</b>" not in page
    assert "Content-Security-Policy" in page


def load_params_default():
    from stages.config import Params

    return Params()
