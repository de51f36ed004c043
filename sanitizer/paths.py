"""Where each stage reads and writes, relative to the project root. dvc.yaml names the same paths."""

from pathlib import Path

INGESTED = Path("data/ingested")
TRAIN_STORE = INGESTED / "train.npz"
TEST_STORE = INGESTED / "test.npz"
SAMPLES_CSV = INGESTED / "samples.csv"
CALIBRATION_STORE = INGESTED / "calibration.npz"  # clean, held out of the test split: the guard's threshold
REDTEAM_TRUTH = INGESTED / "redteam_truth.csv"  # read by metrics only, never by a defense
REDTEAM_TEST = INGESTED / "redteam_test.npz"  # triggered non-target test images labelled as the target: metrics only
CANARY_TRUTH = INGESTED / "canary_truth.csv"  # which training samples are canaries (sanitizer/canary.py): metrics only
RULES_JSON = INGESTED / "rules.json"  # settings decided from the training images (sanitizer/rules.py)

ISOLATE = Path("data/isolate")
SCORES_CSV = ISOLATE / "scores.csv"
ISOLATED_CSV = ISOLATE / "isolated.csv"
SUSPECT_COLUMNS = ["id", "label", "signal", "score"]  # of every flagging stage's table: isolated.csv, flagged.csv
SELECTION_JSON = ISOLATE / "selection.json"  # the selection rule's report: its evidence decides the next steps
ISOLATE_MODEL = Path("models/isolate.pt")

RECHECK = Path("data/recheck")  # the second look, when isolation found no evidence
FLAGGED_CSV = RECHECK / "flagged.csv"
RECHECK_JSON = RECHECK / "report.json"
RECHECK_CURVE = RECHECK / "curve.csv"  # the fresh model's training curve, which the unlearning plot continues
RECHECK_MODEL = Path("models/recheck.pt")  # the model trained afresh for the second look (empty when none ran)

QUARANTINE = Path("data/quarantine")
QUARANTINE_CSV = QUARANTINE / "quarantine.csv"
QUARANTINE_STORE = QUARANTINE / "quarantine.npz"
QUARANTINE_IMAGES = QUARANTINE / "images"
SCAN_IMAGES = QUARANTINE / "scan"  # the gate's reversed triggers, one picture a class, shown on the review page
KEPT_CSV = QUARANTINE / "kept.csv"  # typical kept samples shown beside the suspects
REVIEW_PAGE = QUARANTINE / "index.html"
CLEAN = Path("data/clean")
CLEAN_STORE = CLEAN / "train.npz"  # the store format (ids, hashes); what unlearn trains on
CLEAN_ARRAYS = CLEAN / "cleaned.npz"  # array sources: x_train, y_train, ids_train, as npz sources are read
KEPT_PATHS = CLEAN / "kept_paths.txt"  # image folders: the kept files, relative to data.path, one a line
DECISIONS_CSV = Path("review/decisions.csv")

MODEL = Path("models/model.pt")
ONNX_MODEL = Path("models/model.onnx")
GUARD_ONNX = Path("models/guard.onnx")

METRICS = Path("metrics")
PLOTS = Path("plots")


def metrics_file(stage: str) -> Path:
    return METRICS / f"{stage}.json"
