"""Static PNG plots (matplotlib, no browser, no CDN) beside the CSV files that `dvc plots` reads.

`dvc plots show` renders HTML that fetches its JavaScript from a CDN; air-gapped and CI users read
these PNGs instead, in the review page and the README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sanitizer.fileio import atomic_path

ISOLATED_COLOR, KEPT_COLOR, ASR_COLOR = "#c0392b", "#2c7fb8", "#8e44ad"


def _figure(width: float = 6.0, height: float = 3.4):
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def isolation_plots(history: np.ndarray, score: np.ndarray, xlabel: str, isolated: np.ndarray, out_dir: Path,
                    describe_cut=lambda v: f"cut: {v:.3g}") -> list[Path]:
    """Distribution of the score the isolation ranked by (low = suspicious), isolated vs kept, with the
    cut; and the mean loss of both groups per epoch (the ABL signature: poison is learned first)."""
    is_isolated = np.zeros(len(score), dtype=bool)
    is_isolated[isolated] = True
    paths = [out_dir / "isolate_loss_distribution.png", out_dir / "isolate_loss_curves.png"]

    plt, fig, ax = _figure()
    bins = np.linspace(score.min(), score.max() + 1e-9, 60)
    ax.hist(score[~is_isolated], bins=bins, color=KEPT_COLOR, alpha=0.7, label=f"kept ({(~is_isolated).sum()})")
    if is_isolated.any():
        ax.hist(score[is_isolated], bins=bins, color=ISOLATED_COLOR, alpha=0.8, label=f"isolated ({is_isolated.sum()})")
        cut = score[is_isolated].max()
        ax.axvline(cut, color="black", linestyle="--", linewidth=1, label=describe_cut(cut))
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(f"Isolation after {history.shape[1]} LGA epochs")
    ax.legend(fontsize=8)
    _save(plt, fig, paths[0])

    plt, fig, ax = _figure()
    epochs = np.arange(1, history.shape[1] + 1)
    ax.plot(epochs, history[~is_isolated].mean(axis=0), color=KEPT_COLOR, marker="o", label="kept")
    if is_isolated.any():
        ax.plot(epochs, history[is_isolated].mean(axis=0), color=ISOLATED_COLOR, marker="o", label="isolated")
    ax.set_yscale("log")
    ax.set_xlabel("isolation epoch")
    ax.set_ylabel("mean loss")
    ax.set_title("Mean loss per epoch (LGA)")
    ax.legend(fontsize=8)
    _save(plt, fig, paths[1])
    return paths


def unlearn_plot(curve: list[dict], path: Path, held_out: bool) -> Path:
    """Clean accuracy on the hold-out (on a share of the training set when nothing was held out) and ASR, where
    red-team truth exists, per fine-tuning/unlearning epoch."""
    plt, fig, ax = _figure()
    steps = np.arange(1, len(curve) + 1)
    ax.plot(steps, [c["clean_accuracy"] for c in curve], color=KEPT_COLOR, marker="o",
            label="clean accuracy (held out)" if held_out else "clean accuracy (training set)")
    if curve and "asr" in curve[0]:
        ax.plot(steps, [c["asr"] for c in curve], color=ASR_COLOR, marker="s", label="ASR (red-team test images)")
    phases = [c["phase"] for c in curve]
    for k in range(1, len(phases)):
        if phases[k] != phases[k - 1]:
            ax.axvline(k + 0.5, color="grey", linestyle=":", linewidth=1)
            ax.text(k + 0.6, 0.5, phases[k], fontsize=8, color="grey")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("epoch (fine-tune, unlearn, repair)")
    ax.set_title("Unlearning")
    ax.legend(fontsize=8, loc="lower left")
    _save(plt, fig, path)
    return path
