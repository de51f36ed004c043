"""Typed params: params.yaml is validated once, here, and every stage gets a `Params`.

params.yaml holds what a user sets: the data, the red team, the model and its training budget, the defense,
the guard's false-positive rate and the gate. Research constants live beside the algorithm that uses them; the
few worth overriding are in the `advanced` section (all optional, documented in the schema).
`python -m stages schema` writes schemas/params.schema.json from these models; a test keeps it current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sanitizer.errors import SanitizeError

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
        0.5, gt=0, lt=1, description="share of the test split (per class) held out to calibrate the guard's "
        "threshold: data no stage trains on and the gate does not score (more images, a tighter threshold)"
    )
    classes: Optional[list[str]] = Field(
        None, min_length=2, description="class names by label; default: from the source, else '0'..'K-1'"
    )


class RedteamParams(Section):
    """A simulated attack for demos, tests and benchmarks. Only ingest (which plants it) and the metrics read it."""
    attack: Optional[Literal["badnets", "blend", "sig", "wanet", "adap_blend", "adap_patch", "bpp", "label_consistent",
                             "all_to_all", "multi_target"]] = Field(
        "badnets", description="trigger used to poison the training set (simulation); null: no poisoning. "
        "badnets, blend, wanet, bpp: dirty-label, all-to-one; sig, label_consistent: clean-label (target-class "
        "samples, labels kept); adap_blend, adap_patch: weak partial triggers plus cover samples that keep their "
        "labels; all_to_all: the badnets patch sends label y to y + 1; multi_target: badnets to `target` and blend to "
        "`second_target`, half the share each (sanitizer/triggers.py)"
    )
    poison_rate: float = Field(0.1, ge=0, le=0.5, description="share of training samples poisoned")
    target: int = Field(0, ge=0, description="label the trigger maps to")
    second_target: int = Field(1, ge=0, description="multi_target: label the second trigger (blend) maps to")
    patch_size: int = Field(3, ge=1, le=16, description="badnets, label_consistent: side of the corner patch, pixels "
                            "(Gu et al. 2017)")
    blend_alpha: float = Field(0.2, gt=0, lt=1, description="blend, adap_blend's test input: weight of the noise "
                               "pattern (Chen et al. 2017)")
    sig_delta: float = Field(20.0, gt=0, le=255, description="sig: amplitude of the sinusoid, in 0-255 pixel units "
                             "(Barni et al. 2019)")
    sig_frequency: float = Field(6.0, gt=0, le=64, description="sig: periods across the image width")
    wanet_k: int = Field(4, ge=2, le=64, description="wanet: side of the control grid of the warping field "
                         "(Nguyen & Tran 2021)")
    wanet_s: float = Field(0.5, gt=0, le=10, description="wanet: warp strength")
    wanet_cross_ratio: float = Field(2.0, ge=0, le=10, description="wanet: noise-mode samples per backdoor sample")
    adap_blend_alpha: float = Field(0.15, gt=0, lt=1, description="adap_blend: weight of the pattern on training "
                                    "samples (Qi et al. 2023; the test input's is blend_alpha)")
    adap_grid: int = Field(4, ge=1, le=16, description="adap_blend: the pattern is cut into grid x grid pieces")
    adap_mask_rate: float = Field(0.5, ge=0, lt=1, description="adap_blend: share of the pieces left off each "
                                  "training sample")
    adap_patches: int = Field(4, ge=1, le=16, description="adap_patch: patches; a training sample carries one")
    adap_patch_alpha: float = Field(0.5, gt=0, le=1, description="adap_patch: opacity of the patch on training "
                                    "samples (the test input carries all at 1)")
    adaptive_cover_ratio: Optional[float] = Field(
        None, ge=0, le=10, description="adap_blend, adap_patch: cover samples (trigger, true label) per poisoned "
        "sample; null: the paper's (1 and 2)")
    bpp_levels: int = Field(8, ge=2, le=128, description="bpp: levels per colour channel (Wang et al. 2022's "
                            "squeeze number)")
    bpp_dither: bool = Field(True, description="bpp: Floyd-Steinberg dithering of the quantisation")
    lc_epsilon: float = Field(16.0, gt=0, le=255, description="label_consistent: L-inf bound of the adversarial "
                              "perturbation, 0-255 pixel units (Turner et al. 2019)")
    lc_amplitude: float = Field(64.0, gt=0, le=255, description="label_consistent: the training samples' trigger "
                                "amplitude, 0-255 (the test input's is 255)")

    @model_validator(mode="after")
    def _two_targets(self) -> "RedteamParams":
        if self.attack == "multi_target" and self.second_target == self.target:
            raise ValueError(f"redteam.second_target must differ from redteam.target ({self.target}) for multi_target")
        return self


class CanaryParams(Section):
    """The self-test (sanitizer/canary.py): backdoors ingest plants on purpose, which the gate checks were removed.
    Only ingest and the metrics read this section."""
    rate: float = Field(0.0, ge=0, le=0.2, description="share of the training set copied, triggered and relabelled "
                        "per canary (one a trigger family), e.g. 0.03; 0: no canaries (the default: docs/method.md, "
                        "Canaries)")
    seed: Optional[int] = Field(None, ge=0, le=2**32 - 1, description="the canaries' secret: their triggers and "
                                "targets are drawn from it; null: from `seed`")


class ModelParams(Section):
    width: int = Field(32, ge=4, le=512, description="channels of the first conv block (doubled per stage)")


class TrainParams(Section):
    """The training budget. The released model trains for isolate_epochs + finetune_epochs in all."""
    isolate_epochs: int = Field(20, ge=1, le=1000, description="epochs of the isolation model (ABL stage one)")
    finetune_epochs: int = Field(20, ge=0, le=1000, description="epochs of clean fine-tuning before unlearning")
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(0.05, gt=0, le=10, description="SGD learning rate of every training run")


class DefenseParams(Section):
    method: Literal["full", "abl", "off"] = Field(
        "full", description="full: the pipeline's defense (docs/method.md); abl: plain Anti-Backdoor Learning "
        "(Li et al. 2021: the 1% lowest-loss samples, gradient ascent), for comparison; off: no sample leaves "
        "training (an undefended baseline the gate should block)"
    )


class GuardParams(Section):
    fpr: float = Field(0.05, gt=0, lt=1, description="false-positive rate the guard (models/guard.onnx) is "
                       "calibrated to, on clean images")


class GateParams(Section):
    max_asr: float = Field(0.05, ge=0, le=1, description="release blocked when any attack success rate is higher")
    min_clean_accuracy: float = Field(0.9, ge=0, le=1, description="release blocked when clean accuracy is lower")
    min_canary_recall: float = Field(
        0.9, ge=0, le=1, description="release blocked when the quarantine holds a smaller share of any canary's "
        "samples (docs/method.md, Canaries)"
    )
    max_scan_anomaly: Optional[float] = Field(
        2.0, gt=0, le=100, description="release blocked when the residual-backdoor scan (sanitizer/scan.py) finds a "
        "class whose reversed trigger's size has a higher anomaly index (Neural Cleanse's 2); null: no scan"
    )
    min_guard_tpr: Optional[float] = Field(
        None, ge=0, le=1, description="release blocked when the guard flags fewer of the red team's triggered "
        "test images; null: reported, not checked"
    )


class AdvancedTrain(Section):
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="SGD weight decay")
    crop_padding: Optional[int] = Field(None, ge=0, le=8, description="random-crop padding in pixels; null: "
                                        "from the image size (sanitizer/rules.py)")
    flip: Optional[bool] = Field(None, description="random horizontal flips; null: from the data, on when the "
                                 "classes look alike mirrored (sanitizer/rules.py)")


class AdvancedIsolate(Section):
    gamma: float = Field(0.5, gt=0, le=10, description="LGA loss floor: sign(L - gamma) * L (ABL eq. 3)")
    ratio: float = Field(0.01, gt=0, le=0.5, description="share isolated when the loss curves show no separate "
                         "group (plain ABL's fixed share)")
    max_ratio: float = Field(0.25, gt=0, le=0.5, description="never isolate more than this share of the set")


class AdvancedUnlearn(Section):
    epochs: int = Field(3, ge=0, le=1000, description="unlearning epochs (full: passes over the clean set)")
    lr: float = Field(2e-3, gt=0, le=1, description="unlearning learning rate")
    holdout: float = Field(0.1, gt=0, lt=0.5, description="share of the clean set held out to watch clean accuracy")
    max_accuracy_drop: float = Field(0.05, ge=0, le=1, description="an unlearning epoch that costs more held-out "
                                     "accuracy than this is rolled back")


class AdvancedGuard(Section):
    confidence: float = Field(
        0.99, ge=0.5, lt=1, description="the guard's false-positive rate, as the gate measures it on the clean "
        "test images, is at most guard.fpr with this probability (a beta-binomial bound on the calibration split)"
    )


class AdvancedExport(Section):
    atol: float = Field(1e-4, gt=0, le=1, description="max |onnxruntime - torch| logit on real samples")
    opset: int = Field(18, ge=18, le=23, description="ONNX opset")


class AdvancedLimits(Section):
    """What ingest and the review commands may read: each checked before anything is allocated
    (sanitizer/untrusted.py). The defaults keep a small hostile file from taking more than about 1 GB."""
    max_file_mb: float = Field(4096, gt=0, description="largest input file (an npz, a CIFAR batch, an image, a "
                               "decisions file), MB")
    max_decoded_mb: float = Field(4096, gt=0, description="largest decoded data set (uint8 pixels, from the declared "
                                  "sizes), MB")
    max_expansion: float = Field(16, ge=1, description="largest ratio of decoded to stored bytes of compressed "
                                 "data (npz members, image folders): a compression bomb expands by thousands")
    max_samples: int = Field(500_000, ge=2, description="most samples in the train and test splits together")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="largest declared width x height of one image")


class AdvancedParams(Section):
    """Research constants a user may still want to override; everything here is optional."""
    train: AdvancedTrain = AdvancedTrain()
    isolate: AdvancedIsolate = AdvancedIsolate()
    unlearn: AdvancedUnlearn = AdvancedUnlearn()
    guard: AdvancedGuard = AdvancedGuard()
    export: AdvancedExport = AdvancedExport()
    limits: AdvancedLimits = AdvancedLimits()


class Params(Section):
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds splits, poisoning, initialisation and batch order")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    data: DataParams = DataParams()
    redteam: RedteamParams = RedteamParams()
    canary: CanaryParams = CanaryParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    defense: DefenseParams = DefenseParams()
    guard: GuardParams = GuardParams()
    gate: GateParams = GateParams()
    advanced: AdvancedParams = AdvancedParams()

    @model_validator(mode="after")
    def _source_needs_path(self) -> "Params":
        if self.data.source != "digits" and not self.data.path:
            raise ValueError(f"data.path is required for data.source={self.data.source!r}")
        return self


# params.yaml is a few KB; these bound what a hostile one can cost (an alias bomb expands exponentially).
PARAMS_MAX_BYTES = 1 << 20
PARAMS_MAX_ALIASES = 20
PARAMS_MAX_DEPTH = 20


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing more than PARAMS_MAX_ALIASES aliases or nesting deeper than PARAMS_MAX_DEPTH, while
    it composes: before an alias can be expanded or a deep structure can exhaust the stack."""

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases, self.depth = 0, 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > PARAMS_MAX_ALIASES:
                raise yaml.YAMLError(f"more than {PARAMS_MAX_ALIASES} aliases (*name); write the values out")
        self.depth += 1
        try:
            if self.depth > PARAMS_MAX_DEPTH:
                raise yaml.YAMLError(f"nested deeper than {PARAMS_MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _shown(value) -> str:
    """A value as an error message may quote it: at most 80 characters, built without expanding the whole value."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxstring, short.maxother = 2, 4, 4, 60, 60
    return short.repr(value)[:80]


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; any problem becomes one SanitizeError naming the key."""
    from sanitizer.untrusted import read_regular

    path = Path(path)
    text = read_regular(path, PARAMS_MAX_BYTES / (1 << 20), "a params file's, fixed",
                        "pass the params file (params.yaml; see README.md)")
    try:
        raw = yaml.load(text.decode("utf-8"), Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as err:
        raise SanitizeError(f"{path}: not valid YAML: {str(err)[:300]}".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SanitizeError(f"{path}: expected a mapping of sections (seed, data, train, ...), got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False)[:5]:
            key = ".".join(str(part) for part in e["loc"]) or "(top level)"
            problems.append(f"{key}: {e['msg']} (got {_shown(e.get('input'))})")
        raise SanitizeError(f"{path}: " + "; ".join(problems)) from None


def params_hash(params: Params) -> str:
    """sha256 of the settings that produce the model (all but the gate's), as canonical JSON."""
    blob = json.dumps(params.model_dump(mode="json", exclude={"gate"}), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def schema_json() -> str:
    return json.dumps(Params.model_json_schema(), indent=2) + "\n"
