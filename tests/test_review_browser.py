"""The review page in a real browser (Debian's chromium, driven by Playwright) on pages the pipeline wrote."""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.browser import chromium_missing, launch, synthetic_page
from conftest import run_cmd, stage_cli

pytestmark = pytest.mark.skipif(chromium_missing() is not None, reason=chromium_missing() or "")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


class Watched:
    """A page that records console errors, uncaught exceptions, dialogs and every request."""

    def __init__(self, browser, **context):
        self.context = browser.new_context(accept_downloads=True, **context)
        self.page = self.context.new_page()
        self.errors, self.requests, self.dialogs = [], [], []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def open(self, path: Path):
        self.page.goto(path.as_uri())
        self.page.wait_for_function("window.reviewReady === true")
        return self.page

    def states(self) -> dict[str, str]:
        return dict(self.page.eval_on_selector_all(".card", "cs => cs.map(c => [c.dataset.id, c.dataset.state])"))


def test_page_loads_without_errors_or_network(browser, pipeline):
    page_file = pipeline / "data/quarantine/index.html"
    w = Watched(browser)
    page = w.open(page_file)
    assert w.errors == []
    outside = [u for u in w.requests if not u.startswith(pipeline.as_uri() + "/")]
    assert outside == [], outside
    header = page.inner_text("header")
    assert "release allowed" in header and "quarantined" in header
    manifest = list(csv.DictReader(open(pipeline / "data/quarantine/quarantine.csv", encoding="utf-8")))
    assert page.locator(".card").count() == len(manifest) > 0
    assert page.locator(".plots img").count() == 3  # both isolation plots and the unlearning plot
    broken = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length")
    assert broken == 0
    w.context.close()


def test_page_shows_the_grid_without_javascript(browser, pipeline):
    w = Watched(browser, java_script_enabled=False)
    w.page.goto((pipeline / "data/quarantine/index.html").as_uri())
    assert w.page.locator(".card").first.is_visible()
    assert not w.page.locator("#export").is_visible()
    w.context.close()


def test_hostile_names_show_as_text_and_run_nothing(browser, tmp_path):
    hostile_class = "<script>alert(1)</script>"
    hostile_id = "x\"' onmouseover=alert(2) <img src=q onerror=alert(3)>"
    page_file = synthetic_page(tmp_path, 3, [hostile_class, "cat"], ids=[hostile_id, "b", "c"])
    w = Watched(browser)
    page = w.open(page_file)
    page.hover(".card")
    page.keyboard.press("ArrowRight")
    assert w.dialogs == [] and w.errors == []
    assert page.eval_on_selector(".card", "c => c.dataset.id") == hostile_id
    assert hostile_id in page.inner_text(".card .id")
    assert hostile_class in page.inner_text("#f-class")
    assert page.evaluate("document.querySelectorAll('script').length") == 1
    w.context.close()


def test_keyboard_review_export_import_and_repro_move_exactly_those_samples(browser, pipeline, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(pipeline, project, symlinks=True)
    page_file = project / "data/quarantine/index.html"
    w = Watched(browser)
    page = w.open(page_file)
    ids = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.id)")
    assert len(ids) >= 4
    for key in ["r", "c", "r", "u", "ArrowRight", "r"]:  # release 1, confirm 2, release 3 and undo, release 4
        page.keyboard.press(key)
    expected = {ids[0]: "release", ids[1]: "confirm", ids[3]: "release"}
    assert {i: s for i, s in w.states().items() if s != "pending"} == expected
    page.reload()
    page.wait_for_function("window.reviewReady === true")
    assert {i: s for i, s in w.states().items() if s != "pending"} == expected  # kept in browser storage
    with page.expect_download() as download:
        page.click("#export")
    exported = tmp_path / "decisions.csv"
    download.value.save_as(exported)
    assert w.errors == []
    w.context.close()

    rows = list(csv.DictReader(open(exported, encoding="utf-8")))
    assert {r["id"]: r["decision"] for r in rows} == expected
    imported = stage_cli(project, "review", "import", str(exported))
    assert imported.returncode == 0, imported.stderr
    assert "dvc repro" in imported.stdout

    # Up to quarantine, where the samples move (the stages after it only retrain on the new split).
    repro = run_cmd([sys.executable, "-m", "dvc", "repro", "quarantine"], project)
    assert repro.returncode == 0, repro.stdout[-2000:] + repro.stderr[-2000:]
    assert "Stage 'ingest' didn't change" in repro.stdout and "Stage 'isolate' didn't change" in repro.stdout
    assert "Running stage 'quarantine'" in repro.stdout
    with np.load(project / "data/clean/train.npz") as clean, np.load(project / "data/quarantine/quarantine.npz") as q:
        clean_ids, q_ids = set(clean["ids"]), set(q["ids"])
    released = {i for i, d in expected.items() if d == "release"}
    assert released <= clean_ids and not released & q_ids
    assert set(ids) - released == q_ids
    summary = stage_cli(project, "review", "summary")
    assert "2 release" in summary.stdout and "1 confirm" in summary.stdout


def test_five_thousand_suspects_are_interactive_quickly(browser, tmp_path, record_property):
    page_file = synthetic_page(tmp_path, 5000, [f"class {k}" for k in range(10)])
    w = Watched(browser)
    start = time.perf_counter()
    page = w.open(page_file)
    page.keyboard.press("ArrowRight")
    page.keyboard.press("c")
    assert page.eval_on_selector_all(".card", "cs => cs[1].dataset.state") == "confirm"
    seconds = time.perf_counter() - start
    record_property("interactive_seconds_5000", round(seconds, 2))
    ready_ms = page.evaluate("document.body.dataset.readyMs")
    print(f"5,000 suspects: interactive after {seconds:.2f} s (script ready at {ready_ms} ms)")
    assert w.errors == []
    assert seconds < 4.0  # the target is 2 s (bench/review_page.py reports it); a loaded CI machine gets slack
    w.context.close()
