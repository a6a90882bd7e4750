"""params.yaml and its loader: every default parses, mistakes name their dotted key, overrides are values set in
params.yaml (comments kept, validated first)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lafs.config import (
    ConfigError,
    IngestParams,
    SSLParams,
    load_params,
    parse_params,
    set_dotted,
)
from lafs.params_edit import set_params

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_parses_and_is_small() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.ingest.source == "lfw"
    # The pretrain section is the scaled-down CPU recipe, not the official one.
    assert params.pretrain.model == params.finetune.model == "lafs_vit_mini"
    assert params.pretrain.epochs < SSLParams().epochs
    assert params.pretrain.out_dim < SSLParams().out_dim
    assert params.pretrain.dtype == "auto"  # fp32 on CPUs without native bf16 matmul


def test_params_yaml_spells_out_every_ingest_default() -> None:
    """params.yaml is the single source of defaults: the ingest section lists every IngestParams field."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(data["ingest"]) == set(IngestParams.model_fields)


def test_every_params_yaml_key_is_commented() -> None:
    for lineno, line in enumerate((REPO / "params.yaml").read_text().splitlines(), 1):
        if re.match(r"^\s+\w+:", line):
            assert "#" in line, f"params.yaml:{lineno} has no comment: {line.strip()}"


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"ingest": {"max_identitie": 3}}, "ingest.max_identitie", "unknown key"),
        ({"pretrain": {"epochs": 0}}, "pretrain.epochs", "greater than or equal to 1"),
        ({"ingest": {"max_reject_fraction": 1.5}}, "ingest.max_reject_fraction", "1.5"),
        ({"ingest": {"s3_endpoint_url": "localhost:9000"}}, "ingest.s3_endpoint_url", "localhost:9000"),
        ({"ingest": {"source": "http://example.com/faces"}}, "ingest.source", "only s3://"),
        ({"ingest": {"source": "s3:///faces"}}, "ingest.source", "names no bucket"),
        ({"ingest": {"formats": ["jpeg"]}}, "ingest.formats", "PIL format names"),
        ({"trainig": {}}, "trainig", "unknown key"),
    ],
)
def test_errors_name_the_dotted_key(data: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(data, "params.yaml")
    assert key in str(err.value)
    assert words in str(err.value)
    assert "params.yaml" in str(err.value)


def test_sets_apply_to_one_load_and_a_leftover_override_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("ingest:\n  source: lfw\n  max_identities: 7\n")
    params = load_params(tmp_path / "params.yaml", sets={"ingest.max_identities": 3})
    assert (params.ingest.source, params.ingest.max_identities) == ("lfw", 3)
    assert load_params(tmp_path / "params.yaml").ingest.max_identities == 7
    (tmp_path / "params.local.yaml").write_text("ingest:\n  source: /data/faces\n")
    with pytest.raises(ConfigError, match=r"params\.local\.yaml is no longer read.*set-params"):
        load_params(tmp_path / "params.yaml")


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(bad)


def test_set_dotted() -> None:
    data: dict = {"ingest": {"source": "lfw"}}
    set_dotted(data, "ingest.max_identities", 5)
    set_dotted(data, "new.deep.key", True)
    assert data == {"ingest": {"source": "lfw", "max_identities": 5}, "new": {"deep": {"key": True}}}
    with pytest.raises(ConfigError, match="'source' is not a section"):
        set_dotted(data, "ingest.source.x", 1)


def test_set_params_edits_params_yaml_in_place_keeping_comments(tmp_path: Path) -> None:
    """What `make pipeline DATA=...` and the flows do (as `dvc exp run --set-param`): values set, comments and
    every other line kept, null for an empty value, nothing written for a bad value or no change."""
    params_file = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    params_file.write_text(original)
    changed = set_params(
        params_file,
        {
            "ingest.source": "/faces",
            "landmarks.models_root": "/models",
            "finetune.crop_scale": [0.9, 1.0],
            "split.protocol_dir": "",
        },
    )
    assert changed["ingest.source"] == ("lfw", "/faces") and "split.protocol_dir" not in changed  # already null
    text = params_file.read_text()
    params = load_params(params_file)
    assert (params.ingest.source, params.landmarks.models_root) == ("/faces", "/models")
    assert params.finetune.crop_scale == (0.9, 1.0)
    diff = [(a, b) for a, b in zip(original.splitlines(), text.splitlines(), strict=True) if a != b]
    assert len(diff) == 3, diff  # one line per changed value, the rest (comments too) untouched
    assert all(a.split("#")[1:] == b.split("#")[1:] for a, b in diff)  # inline comments kept
    assert yaml.safe_load(text)["split"]["protocol_dir"] is None

    before = params_file.stat().st_mtime_ns
    assert set_params(params_file, {"ingest.source": "/faces"}) == {}
    assert params_file.stat().st_mtime_ns == before
    set_params(params_file, {"landmarks.models_root": ""})
    assert load_params(params_file).landmarks.models_root is None

    for bad, match in (
        ({"ingest.max_identities": 0}, r"ingest\.max_identities"),
        ({"ingest.max_idents": 3}, "unknown key"),
        ({"nosection.x": 1}, "no section 'nosection'"),
    ):
        with pytest.raises(ConfigError, match=match):
            set_params(params_file, bad)
    assert load_params(params_file).ingest.max_identities is None  # untouched by the refused sets
