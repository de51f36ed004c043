"""`python -m stages review`: edits review/decisions.csv atomically, validated against the quarantine."""

from __future__ import annotations

import csv
import shutil

import pytest

from conftest import stage_cli


@pytest.fixture
def reviewed(pipeline, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(pipeline, project, symlinks=True)
    ids = [r["id"] for r in csv.DictReader(open(project / "data/quarantine/quarantine.csv", encoding="utf-8"))]
    return project, ids


def decisions(project) -> dict:
    return {r["id"]: (r["decision"], r["note"])
            for r in csv.DictReader(open(project / "review/decisions.csv", encoding="utf-8"))}


def test_release_confirm_reset_and_summary(reviewed):
    project, ids = reviewed
    assert stage_cli(project, "review", "release", ids[0], ids[1], "--note", "honest, odd stroke").returncode == 0
    assert stage_cli(project, "review", "confirm", ids[2]).returncode == 0
    assert decisions(project) == {ids[0]: ("release", "honest, odd stroke"), ids[1]: ("release", "honest, odd stroke"),
                                  ids[2]: ("confirm", "")}
    assert stage_cli(project, "review", "reset", ids[1]).returncode == 0
    assert set(decisions(project)) == {ids[0], ids[2]}
    summary = stage_cli(project, "review", "summary").stdout
    assert "1 release" in summary and "1 confirm" in summary and "not applied yet" in summary
    listed = stage_cli(project, "review", "list", "--decision", "confirm").stdout
    assert ids[2] in listed and ids[0] not in listed


def test_unknown_ids_and_bad_imports_change_nothing(reviewed, tmp_path):
    project, ids = reviewed
    stage_cli(project, "review", "confirm", ids[0])
    before = (project / "review/decisions.csv").read_bytes()
    bad = stage_cli(project, "review", "release", ids[1], "not-a-suspect")
    assert bad.returncode == 2 and "'not-a-suspect'" in bad.stderr and "unchanged" in bad.stderr
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(f"id,decision,note\n{ids[1]},maybe,\n", encoding="utf-8")
    bad = stage_cli(project, "review", "import", str(wrong))
    assert bad.returncode == 2 and "wrong.csv:2" in bad.stderr and "'maybe'" in bad.stderr
    assert stage_cli(project, "review", "import", str(tmp_path / "missing.csv")).returncode == 2
    assert (project / "review/decisions.csv").read_bytes() == before
    assert not list((project / "review").glob(".*tmp"))  # no temporary left behind
