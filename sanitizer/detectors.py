"""Malicious-example detectors: one suspicion score per image, higher = more suspicious.

Jin et al. ("A Unified Framework for Analyzing and Detecting Malicious Examples of DNN Models") show
that backdoor inputs, like adversarial examples, stand out inside the model in three ways; one
detector of each family here, each a pure function of a model, a batch of images (float32 [N, C, H, W]
in [0, 1], on the model's device) and, where needed, statistics fitted on data:

- model sensitivity: `strip` (Gao et al. 2019, STRIP): a trigger survives superimposition with clean
  images and keeps the prediction, so a triggered input's blends have low prediction entropy;
- model sensitivity: `noise_fragility` (input mutation, Wang et al. 2019, one of Jin et al.'s sensitivity
  detectors): a warping trigger (WaNet) is a fine resampling pattern that slight Gaussian noise masks, so a
  sample the model maps to its label through that trigger loses its label's probability under noise;
- activation space: `mahalanobis` (Lee et al. 2018): distance of a conv stage's pooled activations to
  the nearest class under a class-conditional Gaussian with one shared covariance;
- activation space, learned (Metzen et al. 2017, detector on intermediate activations; fitted by logistic
  regression like Lee et al.'s): a linear probe on the last conv blocks' channel statistics, trained to tell
  clean training images from FGSM / PGD examples of them (`fit_adversarial_probe`, `adversarial_examples`) or
  from the quarantined suspects (`fit_quarantine_probe`); and a small CNN trained on the pixels to tell the suspects
  from clean images (`fit_quarantine_net`);
- feature space: `spectral` (Tran et al. 2018, spectral signatures): within a class, poisoned samples
  lie along the top singular direction of the centred penultimate features; and k-NN (Sun et al. 2022):
  `kth_distance` of the normalised penultimate feature to clean neighbours (the guard's `knn`), or
  within the label on the training set (`knn_density`).

Used twice: on the training set by isolate (fused isolation, extra evidence) and, through sanitizer/guard.py,
on inputs of the released model at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

BATCH = 1024
TRAINING_DETECTORS = ("strip", "mahalanobis", "knn_density")  # scored on the training set: scores.csv, review page
STRIP_BLENDS = 4  # clean images superimposed on each input
STRIP_ALPHA = 0.5  # weight of the superimposed clean image
DENSITY_K = 20  # knn_density: the neighbour (within the label) whose distance is the score
WHITEN_RIDGE = 3e-4  # input_spectral: floor added to each pixel-covariance eigenvalue, as a share of the largest
MAHALANOBIS_STAGES = "last"  # the conv stages mahalanobis reads: "last" or "all"


def in_batches(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


@torch.no_grad()
def features(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's pooled activations and, last, the penultimate feature, for a whole set (eval mode)."""
    model.eval()
    chunks = [model.activations(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    return [torch.cat(parts) for parts in zip(*chunks)]


@torch.no_grad()
def strip(model, x: torch.Tensor, bank: torch.Tensor, n_blends: int = 8, alpha: float = 0.5,
          seed: int = 0) -> torch.Tensor:
    """STRIP (Gao et al., ACSAC 2019): minus the mean prediction entropy of `n_blends` superimpositions
    (1 - alpha) * x + alpha * clean image. Clean inputs blended with other classes lose their class
    (high entropy); a trigger keeps pulling to the target (low entropy)."""
    model.eval()
    gen = torch.Generator(device=bank.device).manual_seed(seed)
    picks = torch.randint(0, len(bank), (n_blends,), generator=gen, device=bank.device)

    def score(xb: torch.Tensor) -> torch.Tensor:
        entropy = torch.zeros(len(xb), device=xb.device)
        for j in picks:
            p = F.softmax(model((1 - alpha) * xb + alpha * bank[j]), dim=1)
            entropy -= (p * torch.log(p.clamp_min(1e-12))).sum(1)
        return entropy / n_blends

    return -in_batches(score, x)


@dataclass(frozen=True)
class Gaussians:
    """Class-conditional Gaussians with one shared covariance, per conv stage (Lee et al. 2018)."""
    means: list[torch.Tensor]  # per stage [K, D]
    precisions: list[torch.Tensor]  # per stage [D, D]
    scales: list[torch.Tensor]  # per stage: median distance on the fit data, to put the stages on one scale


def fit_gaussians(stage_acts: list[torch.Tensor], labels: torch.Tensor, n_classes: int) -> Gaussians:
    means, precisions, scales = [], [], []
    for a in stage_acts:
        a = a.double()
        mu = torch.stack([a[labels == c].mean(0) if (labels == c).any() else a.mean(0) for c in range(n_classes)])
        centred = a - mu[labels]
        cov = centred.T @ centred / len(a)
        # Shrinkage keeps the precision finite when a stage has dead (constant) channels.
        cov += 1e-3 * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        prec = torch.linalg.inv(cov)
        means.append(mu.float())
        precisions.append(prec.float())
        scales.append(_min_distance(a.float(), mu.float(), prec.float()).median())
    return Gaussians(means, precisions, scales)


def _distances(a: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance to every class mean, [N, K]: d = a'Pa - 2 a'P mu + mu'P mu."""
    ap = a @ prec
    return ((ap * a).sum(1, keepdim=True) - 2 * ap @ mu.T + ((mu @ prec) * mu).sum(1)[None, :]).clamp_min(0)


def _min_distance(a: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """Squared Mahalanobis distance to the nearest class mean, [N]."""
    return _distances(a, mu, prec).min(1).values


def conv_stages(acts: list[torch.Tensor], which: str) -> list[torch.Tensor]:
    """The pooled conv stages of `features` that mahalanobis reads (`MAHALANOBIS_STAGES`): the last
    one alone, or all of them."""
    return acts[-2:-1] if which == "last" else acts[:-1]


def mahalanobis(stage_acts: list[torch.Tensor], g: Gaussians) -> torch.Tensor:
    """Lee et al. (NeurIPS 2018): per stage, the distance to the nearest class, divided by its median on
    the fit data, summed over the stages given (`conv_stages`). The last stage alone separates best; the early
    stages barely move (docs/method.md, "Isolation")."""
    return sum(_min_distance(a, mu, p) / s for a, mu, p, s in zip(stage_acts, g.means, g.precisions, g.scales))


def mismatch(stage_acts: list[torch.Tensor], g: Gaussians, predicted: torch.Tensor) -> torch.Tensor:
    """Activation space, class-conditional: how much farther the input's activations lie from the class the
    model predicts than from the nearest class (Lee et al.'s Gaussians), per stage divided by its median on
    the fit data, summed over the stages given; 0 when the two agree. The consistency check of Deep k-NN
    (Papernot & McDaniel 2018) with Gaussians instead of neighbours: a warping trigger (WaNet) keeps the
    activations near the image's own class while the output obeys the trigger. It sees WaNet only with Gaussians
    fitted on truly clean data: on the sanitized set WaNet's poison drags the target's Gaussian toward the triggered
    images, so the guard does not ship it; PGD moves every stage with the output (docs/method.md, "The guard")."""
    total = 0
    for a, mu, p, s in zip(stage_acts, g.means, g.precisions, g.scales):
        d = _distances(a, mu, p)
        total = total + (d.gather(1, predicted[:, None])[:, 0] - d.min(1).values) / s
    return total


def adversarial_examples(model, x: torch.Tensor, y: torch.Tensor, steps: int, eps: float,
                         batch_size: int = 256) -> torch.Tensor:
    """L-infinity FGSM (steps=1, Goodfellow et al. 2015) or PGD (Madry et al. 2018, `steps` steps of eps/4, no
    random start) against `model`, in [0, 1] pixels: the probe's training data, and the benchmark's attacks."""
    model.eval()
    step = eps if steps == 1 else eps / 4
    out = []
    with torch.enable_grad():
        for i in range(0, len(x), batch_size):
            x0, xa = x[i:i + batch_size], x[i:i + batch_size].clone()
            for _ in range(steps):
                xa.requires_grad_(True)
                grad, = torch.autograd.grad(F.cross_entropy(model(xa), y[i:i + batch_size]), xa)
                xa = torch.min(torch.max(xa.detach() + step * grad.sign(), x0 - eps), x0 + eps).clamp(0, 1)
            out.append(xa.detach())
    return torch.cat(out)


@dataclass(frozen=True)
class Probe:
    """A linear score on standardised block statistics: (s - mean) / scale @ weight + bias."""
    mean: torch.Tensor  # [D]
    scale: torch.Tensor  # [D]
    weight: torch.Tensor  # [D]
    bias: float


def block_statistics(model, x: torch.Tensor, blocks: int) -> torch.Tensor:
    model.eval()
    return in_batches(lambda xb: model.activations(xb, block_statistics=blocks)[1], x)


def fit_linear_probe(negative: torch.Tensor, positives: list[torch.Tensor]) -> Probe:
    """Logistic regression (L2, C=1) of `negative` rows (0) against every group of `positives` (1), each column
    standardised on all the rows; the two classes weigh alike, however many rows each has."""
    from sklearn.linear_model import LogisticRegression

    n_pos = sum(len(p) for p in positives)
    rows = torch.cat([negative, *positives]).double()
    mean, scale = rows.mean(0), rows.std(0).clamp_min(1e-6)
    target = torch.cat([torch.zeros(len(negative)), torch.ones(n_pos)])
    weight = torch.cat([torch.full((len(negative),), n_pos / len(negative)), torch.ones(n_pos)])
    lr = LogisticRegression(C=1.0, max_iter=5000).fit(((rows - mean) / scale).cpu().numpy(), target.numpy(),
                                                       sample_weight=weight.numpy())
    as_tensor = lambda v: torch.as_tensor(v, dtype=torch.float32, device=negative.device)
    return Probe(as_tensor(mean), as_tensor(scale), as_tensor(lr.coef_[0]), float(lr.intercept_[0]))


@torch.no_grad()
def fit_adversarial_probe(model, x: torch.Tensor, y: torch.Tensor, eps: float, steps: list[int], blocks: int) -> Probe:
    """`fit_linear_probe` of clean images against their adversarial examples, one per entry of `steps`, on the
    `block_statistics` of the last `blocks` conv blocks. An attack moves every block's statistics a little, one
    Gaussian per class sees only the last (Mahalanobis); the probe weighs them all. It catches mainly the attacks it
    was fitted on, so it is fitted on those the benchmark measures (docs/method.md, "The guard")."""
    clean = block_statistics(model, x, blocks)
    return fit_linear_probe(clean, [block_statistics(model, adversarial_examples(model, x, y, s, eps), blocks)
                                    for s in steps])


@torch.no_grad()
def fit_quarantine_probe(model, clean: torch.Tensor, suspects: torch.Tensor, blocks: int) -> Probe:
    """`fit_linear_probe` of clean training images against the quarantined suspects, on the `block_statistics`
    of the last `blocks` conv blocks: the poison's activations separate from clean ones (Chen et al. 2019,
    activation clustering), and do so even in the released model, which unlearned the trigger's label but
    still sees the trigger (docs/method.md, "The guard")."""
    return fit_linear_probe(block_statistics(model, clean, blocks), [block_statistics(model, suspects, blocks)])


def probe_score(stats: torch.Tensor, p: Probe) -> torch.Tensor:
    return ((stats - p.mean) / p.scale) @ p.weight + p.bias


def fit_quarantine_net(clean: torch.Tensor, suspects: torch.Tensor, spec: dict, epochs: int, rounds: int,
                       refine: float, seed: int, batch_size: int = 128):
    """A small CNN (`spec`: models.model_spec with two classes) trained to tell the quarantined suspects (1) from clean
    training images (0), on the pixels: Metzen et al. (2017)'s learned detector, trained on the quarantine as
    `fit_quarantine_probe` is, but reading the input itself, so it learns a trigger the released model no longer
    represents. The classes weigh alike. Then self-training: each further round a fresh net trains on the (1 -
    `refine`) share of suspects the last one scored highest, the rest (the clean samples isolation took along, mostly
    of the target's class) left out of training, not moved to the clean side, where the poison among them would
    teach the net that triggered images are clean. Each round keeps more poison among the suspects it trains on
    (docs/method.md, "The guard")."""
    from sanitizer.models import build_model
    from sanitizer.train import batches

    @torch.enable_grad()  # callers fit detectors under no_grad
    def train(positives: torch.Tensor) -> torch.nn.Module:
        torch.manual_seed(seed)
        net = build_model(spec).to(clean.device)
        # Few positives against many clean images: repeated until the class weight is at most 10. A large class
        # weight alone broke the later rounds' training (docs/method.md, "The guard").
        positives = positives.repeat(max(1, -(-len(clean) // (10 * max(len(positives), 1)))), 1, 1, 1)
        x = torch.cat([clean, positives])
        y = torch.cat([torch.zeros(len(clean), dtype=torch.long, device=x.device),
                       torch.ones(len(positives), dtype=torch.long, device=x.device)])
        weight = torch.tensor([1.0, len(clean) / max(len(positives), 1)], device=x.device)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * -(-len(y) // batch_size))
        gen = torch.Generator(device=x.device).manual_seed(seed)
        net.train()
        for _ in range(epochs):
            for idx in batches(len(y), batch_size, gen, x.device):
                loss = F.cross_entropy(net(x[idx]), y[idx], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return net.eval()

    net = train(suspects)
    for _ in range(rounds - 1 if refine and len(suspects) > 1 else 0):
        with torch.no_grad():
            score = in_batches(lambda xb: quarantine_net_score(net, xb), suspects)
        net = train(suspects[score >= score.quantile(refine)])
    return net


def quarantine_net_score(net, x: torch.Tensor) -> torch.Tensor:
    """The quarantine net's log-odds that x is a suspect."""
    logits = net(x)
    return logits[:, 1] - logits[:, 0]


def spectral(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Spectral signatures (Tran et al., NeurIPS 2018): within each label, the squared projection of the
    centred penultimate feature on the top right singular vector, divided by its class median. A
    backdoor's samples share one feature the clean samples of their label lack, and that direction
    dominates the class's covariance."""
    out = torch.zeros(len(feats), device=feats.device)
    for rows, proj in top_projections(feats, labels, min_rows=2):
        squared = proj ** 2
        out[rows] = (squared / squared.median().clamp_min(1e-12)).float()
    return out


def top_projections(feats: torch.Tensor, labels: torch.Tensor, min_rows: int):
    """Per label with at least `min_rows` samples: (its rows, the projection of its centred rows, in float64, on
    their top right singular vector), the direction spectral signatures read."""
    for c in labels.unique():
        rows = labels == c
        if int(rows.sum()) < min_rows:
            continue
        centred = feats[rows].double() - feats[rows].double().mean(0)
        yield rows, centred @ torch.linalg.svd(centred, full_matrices=False).Vh[0]


WHITEN_SIDE = 32  # larger images are average-pooled to at most this side: the pixel covariance is (C * side^2)^2


def whitened_pixels(x: torch.Tensor, ridge: float) -> torch.Tensor:
    """Images N x C x H x W, flattened, centred and whitened by the set's own pixel covariance, each eigenvalue raised
    by `ridge` times the largest (the spectrum of natural images falls by orders of magnitude: unfloored, the whitening
    would blow up sensor noise). In whitened space every direction a clean image varies in has unit variance, so a
    pattern that natural images hardly hold (a fine sinusoid, a noise blend, a sharp-edged patch) is long."""
    if max(x.shape[-2:]) > WHITEN_SIDE:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], WHITEN_SIDE), min(x.shape[-1], WHITEN_SIDE)))
    flat = x.reshape(len(x), -1).double()
    flat = flat - flat.mean(0)
    eigenvalues, vectors = torch.linalg.eigh(flat.T @ flat / max(len(flat), 1))
    return flat @ (vectors / (eigenvalues.clamp_min(0) + ridge * eigenvalues.max().clamp_min(1e-12)).sqrt())


def input_spectral(x: torch.Tensor, labels: torch.Tensor, ridge: float) -> torch.Tensor:
    """Spectral signatures (Tran et al., NeurIPS 2018) in whitened pixel space, the whitening of SPECTRE (Hayase et
    al., ICML 2021) taken to the input: within each label, the projection of the whitened, centred images on their top
    right singular vector, as a robust z-score (median / MAD), signed so that the longer tail is positive. Poison
    shares one additive pattern; whitened, that pattern outweighs the label's own variation in some direction, which
    the top singular vector finds. Needs no model: it sees a trigger before any model learned it; WaNet's warp is no
    additive pattern and is not seen (docs/method.md, "Second look")."""
    out = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    for rows, proj in top_projections(whitened_pixels(x, ridge), labels, min_rows=3):
        score = robust_z(proj)
        out[rows] = score if score.max() >= -score.min() else -score
    return out.float()


def centroid_distance(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cosine distance of each normalised penultimate feature to the normalised mean of its label's (feature space:
    the class-mean distance behind the deep k-NN and Mahalanobis detectors, Lee et al. 2018, in its simplest form).
    A trigger the model obeys pulls its samples' features off the class's clean mode; within the target label the
    poison sits farther out (docs/method.md, "Second look")."""
    f = F.normalize(feats.double(), dim=1)
    out = torch.zeros(len(feats), dtype=torch.float64, device=feats.device)
    for c in labels.unique():
        rows = labels == c
        out[rows] = 1 - f[rows] @ F.normalize(f[rows].mean(0), dim=0)
    return out.float()


def kth_distance(feats: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each L2-normalised feature to its k-th nearest row of `bank` (rows unit length);
    a matmul and a top-k, so it runs in any batch and exports to ONNX."""
    f = F.normalize(feats, dim=1)
    squared = (2 - 2 * f @ bank.T).clamp_min(0)
    return squared.topk(k, dim=1, largest=False).values[:, -1].sqrt()


def knn_density(feats: torch.Tensor, labels: torch.Tensor, k: int = 20) -> torch.Tensor:
    """k-NN density within each label (feature space, after Sun et al. 2022): minus the distance from the
    normalised penultimate feature to its k-th nearest other sample of the same label. A learned trigger
    collapses its samples onto one feature, so poison lies in a dense clump; clean samples spread out."""
    out = torch.zeros(len(feats), device=feats.device)
    for c in labels.unique():
        rows = torch.nonzero(labels == c).flatten()
        if len(rows) < 2:
            continue
        bank = F.normalize(feats[rows], dim=1)
        out[rows] = -in_batches(lambda f: kth_distance(f, bank, min(k + 1, len(rows))), feats[rows])  # +1: itself
    return out


def training_scores(model, x: torch.Tensor, labels: torch.Tensor, names, seed: int,
                    feats: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The detectors `names` scored on a training set with the isolation model; statistics are fitted on the set
    itself (no clean reference exists at training time). `feats`: `features(model, x)`, when the caller has them."""
    scores = {}
    if feats is None and set(names) - {"strip", "input_spectral"}:
        feats = features(model, x)
    for name in names:
        if name == "strip":
            bank = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:256].to(x.device)]
            scores[name] = strip(model, x, bank, STRIP_BLENDS, STRIP_ALPHA, seed)
        elif name == "mahalanobis":
            stage_acts = conv_stages(feats, MAHALANOBIS_STAGES)
            scores[name] = mahalanobis(stage_acts, fit_gaussians(stage_acts, labels, int(labels.max()) + 1))
        elif name == "spectral":
            scores[name] = spectral(feats[-1], labels)
        elif name == "knn_density":
            scores[name] = knn_density(feats[-1], labels, DENSITY_K)
        elif name == "input_spectral":
            scores[name] = input_spectral(x, labels, WHITEN_RIDGE)
        else:
            raise ValueError(f"unknown training detector {name!r}")
    return scores


@torch.no_grad()
def noise_fragility(model, x: torch.Tensor, labels: torch.Tensor, sigma: float, draws: int, seed: int) -> torch.Tensor:
    """How much of its label's probability each sample loses when Gaussian noise of `sigma` (in [0, 1] pixels) is
    added, averaged over `draws` draws (eval mode). A warping trigger's samples lose the most; patch and blend
    triggers survive such noise and do not show (docs/method.md, "Second look")."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    model.eval()
    lost = torch.zeros(len(x), device=x.device)
    for start in range(0, len(x), BATCH):
        batch, label = x[start:start + BATCH], labels[start:start + BATCH, None]
        before = model(batch).softmax(1).gather(1, label)[:, 0]
        for _ in range(draws):
            noisy = (batch + sigma * torch.randn(batch.shape, generator=gen, device=x.device)).clamp(0, 1)
            lost[start:start + len(batch)] += (before - model(noisy).softmax(1).gather(1, label)[:, 0]) / draws
    return lost


def median_mad(score: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(median, 1.4826 * median absolute deviation) along `dim`: a centre and a spread (the standard
    deviation for Gaussian data) that a few outliers do not move."""
    centre = score.median(dim=dim).values
    return centre, (score - centre).abs().median(dim=dim).values * 1.4826


def robust_z(score: torch.Tensor) -> torch.Tensor:
    """(score - median) / spread (`median_mad`): scores of any scale on one, outliers kept."""
    centre, spread = median_mad(score)
    return (score - centre) / spread.clamp_min(1e-12)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half)."""
    pos, neg = positive.double().flatten(), negative.double().flatten()
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    return float(greater + ties / 2)
