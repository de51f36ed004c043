"""params.yaml is validated at the boundary; a wrong key or value names the key and exits 2."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from conftest import stage_cli
from sanitizer.config import Params, load_params, schema_json
from sanitizer.errors import SanitizeError
from conftest import ROOT


def test_schema_file_is_current():
    assert (ROOT / "schemas/params.schema.json").read_text() == schema_json(), \
        "run `python -m stages schema` and commit schemas/params.schema.json"


def test_default_params_file_is_valid_and_matches_documented_keys():
    params = load_params(ROOT / "params.yaml")
    assert params.data.source == "digits" and params.redteam.attack == "badnets"
    assert params.redteam.poison_rate == 0.1 and params.redteam.target == 0
    assert params.gate.max_asr == 0.05 and params.defense.method == "full"


def count_keys(node: dict) -> int:
    return sum(count_keys(v) if isinstance(v, dict) and v else 1 for v in node.values())


def test_params_file_is_a_small_surface_with_a_comment_per_key():
    import yaml

    text = (ROOT / "params.yaml").read_text()
    assert count_keys(yaml.safe_load(text)) <= 25
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"params.yaml: {line.strip()!r} has no comment"


def test_advanced_overrides_are_validated_too(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("advanced:\n  isolate:\n    ratio: 0.02\n")
    assert load_params(path).advanced.isolate.ratio == 0.02
    path.write_text("advanced:\n  isolate:\n    ratoi: 0.02\n")
    with pytest.raises(SanitizeError, match=r"advanced\.isolate\.ratoi"):
        load_params(path)


@pytest.mark.parametrize("text, key", [
    ("advanced:\n  isolate:\n    ratio: 0.9\n", "advanced.isolate.ratio"),
    ("train:\n  ratoi: 0.1\n", "train.ratoi"),
    ("redteam:\n  poison_rate: -0.1\n", "redteam.poison_rate"),
    ("train:\n  isolate_epochs: many\n", "train.isolate_epochs"),
    ("defense:\n  method: magic\n", "defense.method"),
    ("seed: 4294967296\n", "seed"),
    ("device: tpu\n", "device"),
    ("data:\n  source: npz\n", "data.path"),
    ("- just\n- a list\n", "mapping"),
    ("train: [unclosed\n", "not valid YAML"),
])
def test_bad_params_name_the_key(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(SanitizeError, match=key.replace(".", r"\.")):
        load_params(path)


def test_cli_exits_2_with_one_line_naming_the_key(project):
    (project / "params.yaml").write_text("advanced:\n  isolate:\n    gamma: -1\n")
    result = stage_cli(project, "isolate")
    assert result.returncode == 2
    assert result.stderr.startswith("error: params.yaml: advanced.isolate.gamma")
    assert "Traceback" not in result.stderr
    assert not (project / "data").exists()


def test_missing_params_file(project):
    (project / "params.yaml").unlink()
    result = stage_cli(project, "ingest")
    assert result.returncode == 2 and "params.yaml: not found" in result.stderr


def test_params_are_frozen():
    with pytest.raises(ValidationError, match="frozen"):
        Params().seed = 3
