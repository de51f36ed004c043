"""Shared fixtures: a temporary copy of the project, and one real `dvc repro` of the default pipeline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ["sanitizer", "stages", "params.yaml", "dvc.yaml", "review", "schemas", ".dvc", ".dvcignore",
                 "pyproject.toml"]


def copy_project(dest: Path) -> Path:
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def set_params(project: Path, **overrides) -> None:
    """set_params(p, **{"isolate.ratio": 0}) rewrites params.yaml with dotted-key overrides."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tool_env() -> dict:
    """`python` and `dvc` resolve to this interpreter's environment, as after `. .venv/bin/activate`."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="False", PYTHONPATH="")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def run_cmd(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)


def stage_cli(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "stages", *args], project)


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A fresh copy of the project as the working directory (stages use paths relative to it)."""
    copy_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """The default pipeline, run once by the real `dvc repro` in a git copy of the project."""
    root = copy_project(tmp_path_factory.mktemp("pipeline"))
    for args in (["git", "init", "-q"], ["git", "add", "-A"],
                 ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=root, check=True, capture_output=True)
    result = run_cmd([sys.executable, "-m", "dvc", "repro"], root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root
