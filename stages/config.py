"""Typed params: params.yaml is validated once, here, and every stage gets a `Params`.

`python -m stages schema` writes schemas/params.schema.json from these models; a test keeps it current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.errors import SanitizeError

PARAMS_FILE = Path("params.yaml")
SCHEMA_FILE = Path("schemas/params.schema.json")


class Section(BaseModel):
    # extra="forbid": a typo in params.yaml is an error, not a silently ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: Literal["digits", "npz", "cifar10", "imagefolder"] = Field(
        "digits", description="digits: scikit-learn's load_digits (embedded); npz: x_train,y_train,x_test,y_test; "
        "cifar10: the python batches directory; imagefolder: train/<class>/*.png|jpg and test/<class>/..."
    )
    path: Optional[str] = Field(None, description="file or directory of the source; unused for digits")
    test_size: float = Field(0.2, gt=0, lt=1, description="test share of digits (the other sources bring their own split)")
    calibration_size: float = Field(
        0.2, gt=0, lt=1, description="share of the test split (per class) held out to calibrate the guard's "
        "threshold: data no stage trains on, which the gate does not score"
    )
    classes: Optional[list[str]] = Field(
        None, min_length=2, description="class names by label; default: from the source, else '0'..'K-1'"
    )


class RedteamParams(Section):
    attack: Optional[Literal["badnets", "blend", "sig", "wanet"]] = Field(
        "badnets", description="trigger used to poison the training set (simulation); null: no poisoning. "
        "badnets, blend, wanet: dirty-label, all-to-one; sig: clean-label (target-class samples, labels kept)"
    )
    poison_rate: float = Field(0.1, ge=0, le=0.5, description="share of training samples poisoned")
    target: int = Field(0, ge=0, description="label the trigger maps to")
    patch_size: int = Field(3, ge=1, le=16, description="badnets: side of the corner patch, pixels (Gu et al. 2017)")
    blend_alpha: float = Field(0.2, gt=0, lt=1, description="blend: weight of the noise pattern (Chen et al. 2017)")
    sig_delta: float = Field(20.0, gt=0, le=255, description="sig: amplitude of the sinusoid, in 0-255 pixel units "
                             "(Barni et al. 2019)")
    sig_frequency: float = Field(6.0, gt=0, le=64, description="sig: periods across the image width")
    wanet_k: int = Field(4, ge=2, le=64, description="wanet: side of the control grid of the warping field "
                         "(Nguyen & Tran 2021)")
    wanet_s: float = Field(0.5, gt=0, le=10, description="wanet: warp strength")
    wanet_cross_ratio: float = Field(2.0, ge=0, le=10, description="wanet: noise-mode samples per backdoor sample")


class ModelParams(Section):
    width: int = Field(32, ge=4, le=512, description="channels of the first conv block (doubled per block)")


class TrainParams(Section):
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(0.05, gt=0, le=10, description="SGD learning rate for isolation and fine-tuning")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    crop_padding: int = Field(1, ge=0, le=8, description="random-crop augmentation: pixels of zero padding")
    flip: bool = Field(False, description="random horizontal flips (off for digits: they are not symmetric)")


class IsolateParams(Section):
    epochs: int = Field(20, ge=1, le=1000, description="LGA training epochs (ABL stage one)")
    gamma: float = Field(0.5, gt=0, le=10, description="LGA loss floor: sign(L - gamma) * L")
    ratio: float = Field(
        0.01, ge=0, le=0.5, description="share of lowest-loss samples isolated (selection: ratio, plain ABL), and "
        "the fallback of selection: adaptive when the loss curves show no separate low-loss group; 0 turns the defense off"
    )
    augment: bool = Field(True, description="random crop/flip (train.*) while isolating; off, the isolation model "
                          "learns a fixed trigger sooner (a flip moves a corner patch), and so do easy clean samples")
    selection: Literal["ratio", "adaptive"] = Field(
        "adaptive", description="ratio: plain ABL, a fixed share; adaptive: the split of the loss curves, see "
        "stages/isolate.py:adaptive_selection"
    )
    concentrate: bool = Field(
        True, description="adaptive: isolate only the majority label of the low-loss group (an all-to-one "
        "backdoor lives in one label)"
    )
    min_separation: float = Field(
        3.5, gt=0, le=100, description="adaptive: the low-loss group is isolated only when it lies this many pooled "
        "standard deviations (of the mean log-loss) below the rest; otherwise the fixed ratio is used"
    )
    class_margin: float = Field(1.2, ge=1, le=100, description="adaptive: one class's own split counts when its "
                                "separation is this many times the next clearest class's (CIFAR-10 subset: at most "
                                "1.02 on clean data and at 1% poison, 1.29 and 1.24 for BadNets and Blend at 5%)")
    weak_margin: float = Field(
        1.1, ge=1, le=100, description="adaptive, no separated group: the evidence is still 'weak' (unlearning goes on "
        "from the isolation model) when one class's split is this many times the next clearest class's, else 'none' "
        "(unlearn.restart)"
    )
    max_ratio: float = Field(0.25, gt=0, le=0.5, description="adaptive: never isolate more than this share of the set")
    refine_k: int = Field(
        20, ge=0, le=1000, description="adaptive, after a separated group: neighbours (cosine, the isolation model's "
        "penultimate features, within the implicated class) that decide each class member's membership, see "
        "stages/isolate.py:refine_by_neighbours. CIFAR-10 subset, fused, precision/recall without and with 20: "
        "BadNets 0.909/0.984 -> 0.992/0.996 (5%), 0.932/1.000 -> 0.977/1.000 (10%); Blend 0.825/0.949 -> "
        "0.937/0.988, 0.998/0.990 -> 1.000/0.998; SIG 0.972/0.957 -> 1.000/0.984, 1.000/1.000 -> 0.992/1.000. 0: off"
    )
    refine_keep: float = Field(0.5, ge=0, le=1, description="refine: an isolated sample stays when at least this "
                               "share of its neighbours is isolated")
    refine_add: float = Field(0.9, ge=0, le=1, description="refine: a sample of the implicated class is isolated "
                              "when at least this share of its neighbours is")


TrainingDetector = Literal["strip", "mahalanobis", "spectral", "knn_density", "input_spectral"]
GuardDetector = Literal["quarantine_knn@isolation", "quarantine_knn@released", "knn@isolation", "knn@released",
                        "mahalanobis@isolation", "mahalanobis@released", "mismatch@isolation", "mismatch@released",
                        "disagreement@isolation", "probe@released", "quarantine_probe@released",
                        "quarantine_probe@isolation", "quarantine_net@input"]


class DetectParams(Section):
    """Malicious-example detectors (stages/detectors.py): evidence for isolation and the inference guard."""
    training: list[TrainingDetector] = Field(
        ["strip", "mahalanobis", "knn_density"], description="detectors scored on the training set with the "
        "isolation model, written to scores.csv and shown on the review page: strip (model sensitivity), "
        "mahalanobis (activation space), spectral and knn_density (feature space); input_spectral (whitened pixels, "
        "no model: also unlearn.recheck's first signal)"
    )
    fusion: list[TrainingDetector] = Field(
        ["strip", "knn_density"], description="detectors fused with the ABL loss to rank samples (the mean of "
        "robust z-scores, stages/isolate.py:fused_suspicion); empty: plain ABL, the loss alone"
    )
    strip_blends: int = Field(4, ge=1, le=64, description="strip: clean images superimposed on each input")
    strip_alpha: float = Field(0.5, gt=0, lt=1, description="strip: weight of the superimposed clean image")
    whiten_ridge: float = Field(
        3e-4, gt=0, le=1, description="input_spectral: floor added to each eigenvalue of the pixel covariance, as a "
        "share of the largest. CIFAR-10 subset, 1% poison, share of the 51 highest scores in the target label: 3e-4: "
        "0.76 (SIG), 0.94 (BadNets, blend), at most 0.31 in a clean label; 1e-3: 0.78, 0.94-0.96, 0.41 (one run's "
        "poisoned sets, before training)"
    )
    density_k: int = Field(20, ge=1, le=1000, description="knn_density: neighbour whose distance (within the "
                           "label) is the score")
    mahalanobis_stages: Literal["last", "all"] = Field(
        "last", description="mahalanobis: the last conv stage, or every conv stage (each divided by its median, "
        "summed). Measured (CIFAR-10 subset, PGD eps 8/255 on the released model, TPR at 5% FPR): last 0.75, all 0.42"
    )
    guard: list[GuardDetector] = Field(
        ["quarantine_net@input", "quarantine_probe@released", "probe@released"], min_length=1,
        description="detectors of the inference guard (models/guard.onnx), each on the released model, on the "
        "isolation checkpoint (which learned the trigger on purpose) or on the input; the guard's score is the "
        "largest of their calibrated scores. quarantine_net (on the input): a small CNN of its own "
        "(detect.net_width), trained on the "
        "pixels to tell the quarantined suspects from clean training images: it learns a trigger the released model "
        "no longer represents (WaNet's warp); quarantine_probe: a logistic regression on the model's block "
        "statistics, clean training images against the quarantined suspects (triggered inputs); probe: the same on "
        "FGSM and PGD examples of clean training images (adversarial inputs). The probes read the released model: "
        "the guard runs its backbone and the net's (see bench/results/guard.md for the cost). Unshipped alternatives "
        "(bench/results/guard.md): knn: distance to clean training features; quarantine_knn: that distance minus "
        "the distance to the quarantined suspects' features; disagreement: how much more the isolation checkpoint "
        "than the released model believes the implicated label (these, quarantine_probe and quarantine_net are left "
        "out when the quarantine is empty); mahalanobis: distance to the nearest class's Gaussian; mismatch: how "
        "much farther "
        "the activations lie from the predicted class than from the nearest"
    )
    guard_fpr: float = Field(0.05, gt=0, lt=1, description="false-positive rate the guard's threshold is "
                             "calibrated to, on the clean calibration split")
    guard_confidence: float = Field(
        0.99, ge=0.5, lt=1, description="the guard's false-positive rate, as the gate measures it on the clean "
        "test images, is at most guard_fpr with this probability, judged from the clean calibration split (a "
        "beta-binomial bound that takes in both samples' noise: more images, less margin); 0.5: about the plain 95th "
        "percentile, whose FPR on new images exceeds guard_fpr about half the time. CIFAR-10 subset, 508 calibration "
        "and 509 test images, 200 re-splits: the measured FPR exceeded 0.05 in 1% of them (mean 0.024); bounding "
        "the true FPR alone at 0.99 left 2-4.5% (mean 0.030), at 0.95 6-9% (mean 0.034)"
    )
    guard_released_share: float = Field(
        0.7, ge=0, le=1, description="share of guard_fpr by which the released model's detectors are scaled "
        "(adversarial examples lie just past its clean tail); the isolation checkpoint's split the rest (a learned "
        "trigger lies far out). Scales only: the threshold's bound holds for any share (stages/guard.py:fpr_shares)"
    )
    guard_shares: Optional[dict[GuardDetector, Annotated[float, Field(gt=0)]]] = Field(
        {"quarantine_net@input": 0.7, "quarantine_probe@released": 0.1, "probe@released": 0.2},
        description="each detector of guard by name: its weight in guard_fpr's split, for its scale (normalised "
        "over the detectors the guard keeps); null: guard_released_share's split. Must name every detector of guard; "
        "a guard list given without it takes null. "
        "The default trades adversarial inputs for WaNet's: CIFAR-10 subset, guard TPR at FPR <= 5% (weights of net, "
        "quarantine_probe, probe), 3-round width-4 net: 0.7/0.1/0.2: WaNet 10% 0.956, PGD 0.927 (re-splits 0.924, "
        "0.920); 2-round width-4 net at 0.55/0.1/0.35: WaNet 0.805, PGD 0.955; without the net (released split): "
        "WaNet 0.28, PGD 0.95"
    )
    disagreement_eps: float = Field(0.05, gt=0, le=1, description="guard disagreement: added to both models' "
                                    "probabilities of the implicated label before their log-ratio")
    knn_k: int = Field(10, ge=1, le=1000, description="guard knn, quarantine_knn: clean neighbour whose distance is "
                       "the score")
    knn_bank: int = Field(2000, ge=10, le=100000, description="guard knn, quarantine_knn: clean training features "
                          "kept in the guard")
    probe_eps: float = Field(8 / 255, gt=0, le=1, description="guard probe: L-infinity budget, in [0, 1] pixels, of "
                             "the adversarial examples of clean training images it is fitted on")
    probe_steps: list[Annotated[int, Field(ge=1, le=100)]] = Field(
        [1, 10], min_length=1, description="guard probe: one attack per entry, 1: FGSM, n > 1: PGD with n steps of "
        "probe_eps / 4, against the released model")
    probe_blocks: int = Field(4, ge=1, le=6, description="guard probe, quarantine_probe: the last conv blocks whose "
                              "channel means and standard deviations they read. Measured (CIFAR-10 subset, "
                              "onnxruntime, batch 512): 2 add 7% of the model's own time and catch 0.88 of PGD, "
                              "0.75 of BadNets 10%; 4 add 25%, 0.95 and 1.00; all 6 add 53%, 0.96 and 1.00")
    probe_samples: int = Field(2000, ge=10, le=100000, description="guard probe, quarantine_probe: clean training "
                               "images they are fitted on (probe attacks each: PGD costs steps forward and backward "
                               "passes)")
    quarantine_k: int = Field(5, ge=1, le=1000, description="guard quarantine_knn: neighbour among the quarantined "
                              "suspects whose distance is subtracted")
    net_width: int = Field(4, ge=1, le=256, description="guard quarantine_net: width of its small CNN (the model's "
                           "architecture). CIFAR-10 subset, WaNet 10%, onnxruntime: 4 costs 0.36 of the width-16 "
                           "model's time, 8 0.57; TPR at 5% FPR (2 rounds, refine 0.3, two seeds): 4 0.91-0.92, "
                           "8 0.85-0.92")
    net_epochs: int = Field(20, ge=1, le=1000, description="guard quarantine_net: epochs of each training round")
    net_rounds: int = Field(3, ge=1, le=10, description="guard quarantine_net: training rounds; each after the "
                            "first trains a fresh net on the suspects the last one scored highest (detect.net_refine)")
    net_refine: float = Field(
        0.55, ge=0, lt=1, description="guard quarantine_net: share of the suspects each round after the first leaves "
        "out, those the last net scored lowest (0: one round). CIFAR-10 subset, WaNet 10% (849 suspects, 502 of them "
        "poison), width 4, 3 rounds: 0.55 keeps 376-381 poison in 382; see detectors.fit_quarantine_net")

    @model_validator(mode="before")
    @classmethod
    def _default_shares_go_with_the_default_guard(cls, data):
        # The default weights name the default guard's detectors: a guard list of one's own without weights of its
        # own splits by guard_released_share.
        if isinstance(data, dict) and "guard" in data and "guard_shares" not in data:
            data = {**data, "guard_shares": None}
        return data

    @model_validator(mode="after")
    def _fusion_is_scored(self) -> "DetectParams":
        missing = [d for d in self.fusion if d not in self.training]
        if missing:
            raise ValueError(f"detect.fusion lists {missing}, which detect.training does not score; add them there")
        unshared = [d for d in self.guard if self.guard_shares is not None and d not in self.guard_shares]
        if unshared:
            raise ValueError(f"detect.guard_shares does not name {unshared} of detect.guard: give each a weight, or set "
                             "guard_shares: null to split by guard_released_share")
        return self


class UnlearnParams(Section):
    finetune_epochs: int = Field(20, ge=0, le=1000, description="cross-entropy epochs on the clean set")
    restart: Literal["no_evidence", "never", "always"] = Field(
        "no_evidence", description="train the released model from a fresh initialisation, for isolate.epochs + "
        "finetune_epochs epochs, instead of fine-tuning the isolation model: no_evidence: when adaptive isolation "
        "found no separated group and no class standing out (the isolation model may have learned a backdoor it "
        "did not isolate); never: plain ABL, always fine-tune the isolation model"
    )
    restart_resample: float = Field(
        0.0, ge=0, le=4, description="a restarted model trains on images translated by a random offset of up to this "
        "many pixels, bilinearly, so every image carries interpolation blur and a warping trigger's (WaNet) no longer "
        "stands out; a blended pattern's fine noise fades too. With the recheck on it no longer helps: CIFAR-10 "
        "subset, ASR with 0.5 against 0: within 0.008 at 1% poison, WaNet 5% 0.043 (0.025), WaNet 10% 0.178 (0.009), "
        "clean accuracy 0.4-3.1 points lower wherever the model restarts (bench row fused+resample). 0: off. Never when "
        "fine-tuning the isolation model, which already learned the trigger (BadNets 10%: ASR 0.043 -> 0.055)"
    )
    recheck: bool = Field(
        True, description="after a fresh start (isolation found no evidence), look again: the share of the clean "
        "set farthest out in whitened pixels (detectors.input_spectral), the isolate.ratio share most fragile under "
        "Gaussian noise with the trained model (detectors.noise_fragility) and the share farthest from their label's "
        "mean penultimate feature (detectors.centroid_distance); when recheck_input_share, recheck_share or "
        "recheck_centroid_share of one carry one label, that label's samples past Kittler's cut are taken out of "
        "training and unlearned, or, when unlearning is rolled back, the model trains again without them (a trigger "
        "too rare for isolation to see; a warping trigger, which the isolation model does not learn early). CIFAR-10 "
        "subset, bench row fused, ASR undefended -> defended: BadNets 1% 0.067 -> 0.036, blend 1% 0.751 -> 0.011, SIG "
        "1% 0.171 -> 0.000, WaNet 5% 0.253 -> 0.025, WaNet 10% 0.720 -> 0.009. false: the restarted model is released "
        "as trained"
    )
    recheck_sigma: float = Field(0.02, gt=0, le=1, description="recheck: standard deviation of the noise, in [0, 1] "
                                 "pixels")
    recheck_share: float = Field(
        0.75, gt=0, le=1, description="recheck: share of the most fragile samples one label must hold to implicate "
        "it (CIFAR-10 subset: at most 0.70 in the other cases, 0.84-0.92 for WaNet 5%, 1.00 for WaNet 10%)"
    )
    recheck_loss: bool = Field(
        True, description="when fragility implicated a label and its flagged samples were unlearned, the label's "
        "other samples past Kittler's cut of their loss are unlearned too: dirty-label poison the recheck missed loses "
        "the trigger's support and its loss rises (CIFAR-10 subset, restarted model: WaNet 10% ASR 0.066 -> 0.032, "
        "WaNet 5% 0.094 -> 0.034). false: the recheck's flags alone"
    )
    recheck_centroid_share: float = Field(
        0.4, gt=0, le=1, description="recheck: share of the samples farthest from their label's mean penultimate "
        "feature that one label must hold to implicate it (CIFAR-10 subset, restarted model: 0.20 on clean data, 0.18 "
        "for SIG 1%, 0.42-0.46 for BadNets 1%, 0.22-0.58 for blend 1% from one machine to another)"
    )
    recheck_input_share: float = Field(
        0.6, gt=0, le=1, description="recheck: share of the samples highest in detectors.input_spectral (whitened "
        "pixels; at least 50) that one label must hold to implicate it (benchmark, after isolation: CIFAR-10 subset, "
        "0.74-0.76 for SIG 1%, 0.94-0.98 for BadNets and blend 1%, at most 0.34 elsewhere; digits at most 0.44)"
    )
    mode: Literal["joint", "ascent"] = Field(
        "joint", description="ascent: plain ABL, gradient ascent -CE on the quarantined set alone; joint: each clean "
        "batch carries the quarantined set, loss CE(clean) + weight * -log(1 - p(label | suspect))"
    )
    epochs: int = Field(3, ge=0, le=1000, description="unlearning epochs (joint: passes over the clean set)")
    lr: float = Field(2e-3, gt=0, le=1, description="unlearning learning rate (ABL's plain ascent: 5e-4)")
    weight: float = Field(1.0, gt=0, le=100, description="joint: weight of the suspects' unlikelihood term")
    stop_at: float = Field(0.05, ge=0, le=1, description="unlearning stops after the epoch where at most this share "
                           "of the quarantined suspects is still classified as its label (0: run all epochs)")
    anchor: bool = Field(True, description="joint: each batch also carries clean samples of the implicated class, "
                         "as many as suspects, so unlearning separates the suspects from that class, not erases it")
    suspects_per_batch: int = Field(16, ge=1, le=65536, description="joint: suspects carried by each clean batch "
                                    "(all of them when there are fewer)")
    batch_size: int = Field(64, ge=1, le=65536, description="ascent: batch size over the quarantined set")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of the clean set held out to watch clean accuracy")
    max_accuracy_drop: float = Field(
        0.05, ge=0, le=1, description="an unlearning epoch after which held-out accuracy (implicated class left out) "
        "dropped more than this is rolled back"
    )
    retries: int = Field(2, ge=0, le=10, description="a rolled-back epoch is retried at half the learning rate, at "
                         "most this many times in all; then unlearning stops (0: stop at the first rollback)")
    implicated_keep: float = Field(
        0.5, ge=0, le=1, description="after a fallback (isolation evidence 'weak'), an unlearning epoch is also rolled "
        "back when the implicated class's held-out accuracy falls below this share of its value before unlearning: "
        "the fallback's suspects may be easy clean samples of that class, and unlearning them erased it (digits, SIG "
        "1%: the class at 0.00, clean accuracy 0.889; 0.953 with the check). 0: off"
    )
    repair_epochs: int = Field(
        1, ge=0, le=1000, description="cross-entropy epochs on the clean set (with augmentation) after unlearning, at "
        "repair_lr, when adaptive isolation found a separated group: they restore the clean accuracy that unlearning "
        "cost (0: plain ABL, none). Not after a fixed share or a fallback, which leave most poison in the clean set"
    )
    repair_lr: float = Field(2e-3, gt=0, le=1, description="learning rate of the repair epochs (cosine schedule); "
                             "measured at 5e-3: Blend and BadNets gained more, SIG, which unlearning barely hurt, lost "
                             "0.016-0.019 of clean accuracy")


class ExportParams(Section):
    atol: float = Field(1e-4, gt=0, le=1, description="max |onnxruntime - torch| on real samples")
    opset: int = Field(18, ge=18, le=23)


class GateParams(Section):
    max_asr: float = Field(0.05, ge=0, le=1, description="release blocked when any attack success rate is higher")
    min_guard_tpr: Optional[float] = Field(
        None, ge=0, le=1, description="release blocked when the guard flags fewer of the red team's triggered "
        "test images; null: reported, not checked"
    )
    min_clean_accuracy: float = Field(0.9, ge=0, le=1, description="release blocked when clean accuracy is lower")


class Params(Section):
    seed: int = Field(0, ge=0, description="seeds splits, poisoning, initialisation and batch order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    data: DataParams = DataParams()
    redteam: RedteamParams = RedteamParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    isolate: IsolateParams = IsolateParams()
    detect: DetectParams = DetectParams()
    unlearn: UnlearnParams = UnlearnParams()
    export: ExportParams = ExportParams()
    gate: GateParams = GateParams()

    @model_validator(mode="after")
    def _source_needs_path(self) -> "Params":
        if self.data.source != "digits" and not self.data.path:
            raise ValueError(f"data.path is required for data.source={self.data.source!r}")
        return self


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; any problem becomes one SanitizeError naming the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SanitizeError(f"{path}: not found; run from the project root or create it (see README.md)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SanitizeError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SanitizeError(f"{path}: expected a mapping of sections (seed, data, isolate, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            key = ".".join(str(part) for part in e["loc"]) or "(top level)"
            problems.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
        raise SanitizeError(f"{path}: " + "; ".join(problems)) from None


def params_hash(params: Params) -> str:
    """sha256 of the settings that produce the model (all but the gate's), as canonical JSON."""
    blob = json.dumps(params.model_dump(mode="json", exclude={"gate"}), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def schema_json() -> str:
    return json.dumps(Params.model_json_schema(), indent=2) + "\n"
