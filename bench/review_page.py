"""python -m bench.review_page: how fast the review page becomes interactive with many suspects.

Renders synthetic quarantines of 200, 1,000 and 5,000 suspects with the pipeline's renderer, opens each
in headless Chromium from file://, and times navigation -> script ready -> a keyboard decision applied.
Writes bench/results/review_page.json. `--screenshot PAGE PNG` saves a screenshot of a page instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.browser import chromium_missing, launch, synthetic_page
from sanitizer.fileio import write_json

ROOT = Path(__file__).resolve().parents[1]


def time_page(browser, page_file: Path) -> tuple[float, float]:
    """(seconds until a keyboard decision is applied, ms until the script reported ready)."""
    context = browser.new_context()
    page = context.new_page()
    start = time.perf_counter()
    page.goto(page_file.as_uri())
    page.wait_for_function("window.reviewReady === true")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("c")
    page.wait_for_function("document.querySelectorAll('.card')[1].dataset.state === 'confirm'")
    seconds = time.perf_counter() - start
    ready_ms = float(page.evaluate("document.body.dataset.readyMs"))
    context.close()
    return seconds, ready_ms


def screenshot(browser, page_file: Path, out: Path) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 1800})
    page.goto(page_file.resolve().as_uri())
    page.wait_for_function("window.reviewReady === true")
    for key in ("r", "c"):  # show a released and a confirmed card, then the top of the page
        page.keyboard.press(key)
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out), full_page=False)
    page.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.review_page", description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="200,1000,5000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--screenshot", nargs=2, metavar=("PAGE", "PNG"), type=Path)
    args = ap.parse_args(argv)
    missing = chromium_missing()
    if missing:
        ap.error(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        if args.screenshot:
            screenshot(browser, *args.screenshot)
            print(f"[bench] wrote {args.screenshot[1]}", file=sys.stderr)
            return 0
        rows = []
        for n in (int(s) for s in args.sizes.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                page_file = synthetic_page(Path(tmp), n, [f"class {k}" for k in range(10)])
                runs = [time_page(browser, page_file) for _ in range(args.repeats)]
                row = {"suspects": n, "html_bytes": page_file.stat().st_size,
                       "interactive_seconds_median": round(statistics.median(r[0] for r in runs), 3),
                       "interactive_seconds_max": round(max(r[0] for r in runs), 3),
                       "script_ready_ms_median": statistics.median(r[1] for r in runs)}
            rows.append(row)
            print(f"[bench] {n} suspects: interactive in {row['interactive_seconds_median']} s (median of "
                  f"{args.repeats}, max {row['interactive_seconds_max']} s), script ready at "
                  f"{row['script_ready_ms_median']:.0f} ms, page {row['html_bytes'] / 1e6:.1f} MB", file=sys.stderr)
        browser.close()
    write_json(ROOT / "bench" / "results" / "review_page.json", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
