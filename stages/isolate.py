"""isolate: Anti-Backdoor Learning stage one (Li et al., NeurIPS 2021, sec. 4.1).

Train from scratch with the LGA loss sign(L - gamma) * L, record every sample's loss after each
epoch, and isolate the `isolate.ratio` share with the lowest final loss: backdoor samples are learned
fastest, so they sit at the bottom. Red-team truth is read only after the choice, for metrics.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import torch

from stages import paths
from stages.config import Params
from stages.data import Store, load_store
from stages.fileio import atomic_dir, write_csv, write_json
from stages.models import build_model, model_spec, save_checkpoint
from stages.train import (Progress, channel_stats, lga_loss, make_optimizer, per_sample_losses, pick_device,
                          seed_everything, to_tensor, train_epoch)


def select_isolated(loss_history: np.ndarray, ids: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the round(ratio * N) lowest final losses; ties broken by id so runs are reproducible."""
    n = int(round(ratio * loss_history.shape[0]))
    order = np.lexsort((ids, loss_history[:, -1]))
    return np.sort(order[:n])


def train_lga(params: Params, store: Store, device: torch.device):
    """Returns the model, its spec and the loss history [N, epochs]."""
    seed_everything(params.seed)
    mean, std = channel_stats(store.x)
    spec = model_spec(store.image_shape, len(store.class_names), params.model.width, mean, std)
    model = build_model(spec).to(device)
    x, y = to_tensor(store.x, device), torch.from_numpy(store.labels).to(device)
    tp, ip = params.train, params.isolate
    opt = make_optimizer(model, tp.lr, tp)
    gen = torch.Generator(device=device).manual_seed(params.seed)
    history = np.zeros((len(store), ip.epochs), dtype=np.float32)
    progress = Progress("isolate", ip.epochs, len(store))
    for epoch in range(ip.epochs):
        train_loss = train_epoch(model, opt, x, y, lambda l: lga_loss(l, ip.gamma), tp.batch_size, gen,
                                 tp.crop_padding, tp.flip)
        history[:, epoch] = per_sample_losses(model, x, y).cpu().numpy()
        progress.epoch(epoch + 1, lga_loss=train_loss, mean_loss=float(history[:, epoch].mean()))
    return model, spec, history


def isolation_metrics(store: Store, isolated: np.ndarray) -> dict:
    """Per-class share of the isolated set; with red-team truth, precision and recall."""
    labels = store.labels[isolated]
    shares = {store.class_names[c]: round(float(np.mean(labels == c)), 4) for c in np.unique(labels)}
    out = {"n_isolated": int(len(isolated)), "isolated_class_share": shares,
           "dominant_class": max(shares, key=shares.get) if shares else None}
    if paths.REDTEAM_TRUTH.exists():  # metrics only: the choice above never saw this file
        poisoned = set(pd.read_csv(paths.REDTEAM_TRUTH, dtype={"id": str})["id"])
        if poisoned:
            hits = sum(1 for i in store.ids[isolated] if i in poisoned)
            out["isolation_precision"] = round(hits / len(isolated), 4) if len(isolated) else None
            out["isolation_recall"] = round(hits / len(poisoned), 4)
    return out


def run(params: Params) -> None:
    device = pick_device(params.device)
    store = load_store(paths.TRAIN_STORE)
    model, spec, history = train_lga(params, store, device)
    isolated = select_isolated(history, store.ids, params.isolate.ratio)

    rank = np.empty(len(store), dtype=np.int64)
    rank[np.lexsort((store.ids, history[:, -1]))] = np.arange(1, len(store) + 1)
    is_isolated = np.zeros(len(store), dtype=bool)
    is_isolated[isolated] = True
    epochs = [f"loss_epoch_{e + 1}" for e in range(history.shape[1])]
    with atomic_dir(paths.ISOLATE) as out:
        scores = pd.DataFrame(history.round(6), columns=epochs)
        scores.insert(0, "id", store.ids)
        scores.insert(1, "label", store.labels)
        scores["final_loss"] = history[:, -1].round(6)
        scores["rank"] = rank
        scores["isolated"] = is_isolated.astype(int)
        scores.to_csv(out / paths.SCORES_CSV.name, index=False)
        order = isolated[np.argsort(rank[isolated])]
        write_csv(out / paths.ISOLATED_CSV.name, ["id", "label", "final_loss", "rank"],
                  [(store.ids[i], int(store.labels[i]), round(float(history[i, -1]), 6), int(rank[i])) for i in order])
    save_checkpoint(paths.ISOLATE_MODEL, model, spec, {"seed": params.seed})

    # Mean loss per epoch of the isolated and the kept samples: the ABL signature, for `dvc plots`.
    kept = ~is_isolated
    write_csv(paths.PLOTS / "isolate_loss.csv", ["epoch", "isolated", "kept"], [
        (e + 1, round(float(history[is_isolated, e].mean()), 6) if is_isolated.any() else "",
         round(float(history[kept, e].mean()), 6)) for e in range(history.shape[1])])
    metrics = isolation_metrics(store, isolated)
    write_json(paths.metrics_file("isolate"), {"device": device.type, **metrics})
    print(f"[isolate] isolated {len(isolated)} of {len(store)} samples; " +
          ", ".join(f"{k}={v}" for k, v in metrics.items() if k.startswith("isolation_")), file=sys.stderr)
