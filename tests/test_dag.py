"""dvc.yaml tells the truth: each stage lists as deps exactly the project modules its command imports, and no stage
module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("sanitizer", "stages")


def module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def direct_imports(path: Path) -> set[Path]:
    """Project modules a file imports anywhere (top level or inside functions), and their packages' __init__."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                parts = name.split(".")
                for k in range(1, len(parts) + 1):
                    f = module_file(".".join(parts[:k]))
                    if f is not None:
                        found.add(f)
    return found


def closure(start: Path) -> set[Path]:
    seen, todo = set(), [start]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += sorted(direct_imports(f) - seen)
    return seen


def stage_modules(stage: str) -> list[str]:
    """Every project file `python -m stages <stage>` may run: the entry point, the stage module, and what they import
    (the entry point imports stages by name, so each stage adds its own module)."""
    files = closure(ROOT / "stages" / "__main__.py") | closure(ROOT / "stages" / f"{stage}.py")
    files.add(ROOT / "stages" / "__init__.py")
    return sorted(str(f.relative_to(ROOT)) for f in files)


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_every_stage_lists_exactly_the_modules_it_imports():
    for name, stage in dvc_stages().items():
        listed = sorted(d for d in stage["deps"] if d.endswith(".py"))
        assert listed == stage_modules(name), f"dvc.yaml stage {name!r}: deps should list {stage_modules(name)}"


def test_no_stage_module_imports_another():
    stages = {ROOT / "stages" / f"{name}.py" for name in dvc_stages()}
    for f in stages:
        assert not (direct_imports(f) & (stages - {f})), f"{f.name} imports another stage module"


def test_library_never_imports_a_stage():
    for f in (ROOT / "sanitizer").glob("*.py"):
        assert not any(d.parent.name == "stages" for d in direct_imports(f)), f"{f.name} imports from stages/"


DEFENSE = ["isolation", "recheck", "unlearning", "pipeline", "quarantine", "guard", "detectors", "train", "rules",
           "models", "data"]
TRUTH = ["canary", "triggers", "metrics"]  # what plants the attacks and canaries, and the only reader of their truth


def test_the_defense_never_imports_what_knows_the_attack_or_the_canaries():
    truth = {ROOT / "sanitizer" / f"{name}.py" for name in TRUTH}
    for name in DEFENSE:
        f = ROOT / "sanitizer" / f"{name}.py"
        assert not direct_imports(f) & truth, f"sanitizer/{name}.py imports one of {TRUTH}"
        assert "canary" not in f.read_text(encoding="utf-8").lower(), f"sanitizer/{name}.py mentions canaries"


if __name__ == "__main__":  # prints each stage's module deps, to paste into dvc.yaml
    for name in dvc_stages():
        print(name, stage_modules(name))
