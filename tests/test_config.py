"""params.yaml is validated at the boundary; a wrong key or value names the key and exits 2."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conftest import stage_cli
from stages.config import Params, load_params, schema_json
from stages.errors import SanitizeError
from conftest import ROOT


def test_schema_file_is_current():
    assert (ROOT / "schemas/params.schema.json").read_text() == schema_json(), \
        "run `python -m stages schema` and commit schemas/params.schema.json"


def test_default_params_file_is_valid_and_matches_documented_keys():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "digits" and params.redteam.attack == "badnets"
    assert params.redteam.poison_rate == 0.1 and params.redteam.target == 0
    assert params.gate.max_asr == 0.05 and params.isolate.ratio == 0.01


@pytest.mark.parametrize("text, key", [
    ("isolate:\n  ratio: 0.9\n", "isolate.ratio"),
    ("isolate:\n  ratoi: 0.1\n", "isolate.ratoi"),
    ("redteam:\n  poison_rate: -0.1\n", "redteam.poison_rate"),
    ("unlearn:\n  epochs: many\n", "unlearn.epochs"),
    ("device: tpu\n", "device"),
    ("data:\n  source: npz\n", "data.path"),
    ("- just\n- a list\n", "mapping"),
    ("isolate: [unclosed\n", "not valid YAML"),
])
def test_bad_params_name_the_key(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(SanitizeError, match=key.replace(".", r"\.")):
        load_params(path)


def test_cli_exits_2_with_one_line_naming_the_key(project):
    (project / "params.yaml").write_text("isolate:\n  gamma: -1\n")
    result = stage_cli(project, "isolate")
    assert result.returncode == 2
    assert result.stderr.startswith("error: params.yaml: isolate.gamma")
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists()


def test_missing_params_file(project):
    (project / "params.yaml").unlink()
    result = stage_cli(project, "ingest")
    assert result.returncode == 2 and "params.yaml: not found" in result.stderr


def test_params_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Params().seed = 3
