"""Headless Chromium for the review-page tests and benchmark: Debian's /usr/bin/chromium driven by
Playwright (its own browser download is not reachable here), and synthetic review pages of any size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling home, which a closed network refuses.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-default-apps"]


def chromium_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (as root: apt-get install -y chromium)"
    return None


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)


def synthetic_page(folder: Path, n: int, class_names: list[str], ids: list[str] | None = None, seed: int = 0) -> Path:
    """A review page with n suspects (32x32 RGB PNGs) rendered by the pipeline's own renderer."""
    from PIL import Image

    from sanitizer.config import Params
    from sanitizer.review_page import render_review_page

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = ids or [f"train-{k:06d}" for k in range(n)]
    labels = np.arange(n) % len(class_names)
    epochs = [f"loss_epoch_{e + 1}" for e in range(10)]
    losses = np.exp(rng.normal(-6, 2, size=(n, 10)))
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"images/{k:05d}.png")
    manifest = pd.DataFrame({"id": ids, "label": labels, "class_name": [class_names[c] for c in labels],
                             "signal": "isolation:fused", "score": np.linspace(5, 1, n), "rank": np.arange(1, n + 1),
                             "final_loss": losses[:, -1], "suspicion": -np.log(losses).mean(1),
                             "decision": "pending", "quarantined": 1, "note": "", "sha256": "",
                             "image": [f"images/{k:05d}.png" for k in range(n)]})
    scores = pd.DataFrame(losses, columns=epochs)
    scores.insert(0, "id", ids)
    scores["isolated"] = 1
    kept_rows = pd.DataFrame({"id": ["kept-0"], "label": [0], "image": ["images/00000.png"]})
    summary = {"n_ingested": 10 * n, "n_clean": 9 * n, "n_quarantined": n, "n_released": 0, "n_confirmed": 0}
    counts = {name: n for name in class_names}
    page = folder / "index.html"
    page.write_text(render_review_page(manifest, scores, kept_rows, summary, counts, class_names, Params(), None, []),
                    encoding="utf-8")
    return page
