"""params.yaml and its loader: every default parses, mistakes name their dotted key, overrides merge."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lafs.cli import write_local_params
from lafs.config import (
    ConfigError,
    IngestParams,
    Params,
    SSLParams,
    deep_merge,
    load_params,
    parse_params,
    set_dotted,
)

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_parses_and_is_small() -> None:
    params = load_params(REPO / "params.yaml", overrides=None)
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


def test_override_file_is_deep_merged(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("ingest:\n  source: lfw\n  max_identities: 7\n")
    (tmp_path / "params.local.yaml").write_text("ingest:\n  source: /data/faces\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.ingest.source == "/data/faces"  # from the override
    assert params.ingest.max_identities == 7  # kept from params.yaml
    assert params.ingest.max_images_per_identity == IngestParams().max_images_per_identity  # model default
    # --set wins over both files
    params = load_params(tmp_path / "params.yaml", sets={"ingest.max_identities": 3})
    assert (params.ingest.source, params.ingest.max_identities) == ("/data/faces", 3)
    # and the override file can be ignored
    assert load_params(tmp_path / "params.yaml", overrides=None).ingest.source == "lfw"


def test_override_file_errors_name_both_files(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("ingest:\n  source: lfw\n")
    (tmp_path / "params.local.yaml").write_text("ingest:\n  max_images: 3\n")
    with pytest.raises(ConfigError, match=r"params.local.yaml(.|\n)*ingest.max_images: unknown key"):
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


def test_deep_merge_does_not_mutate_inputs() -> None:
    base = {"a": {"b": 1, "c": {"d": 2}}, "x": [1]}
    override = {"a": {"c": {"e": 3}}, "x": [2]}
    merged = deep_merge(base, override)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "x": [2]}
    assert base == {"a": {"b": 1, "c": {"d": 2}}, "x": [1]}
    merged["a"]["c"]["d"] = 99
    assert base["a"]["c"]["d"] == 2


def test_set_dotted() -> None:
    data: dict = {"ingest": {"source": "lfw"}}
    set_dotted(data, "ingest.max_identities", 5)
    set_dotted(data, "new.deep.key", True)
    assert data == {"ingest": {"source": "lfw", "max_identities": 5}, "new": {"deep": {"key": True}}}
    with pytest.raises(ConfigError, match="'source' is not a section"):
        set_dotted(data, "ingest.source.x", 1)


def test_local_params_always_hold_every_section(tmp_path: Path) -> None:
    """What `make pipeline` writes: each section present (DVC needs it), make keys set, other keys kept."""
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    local = tmp_path / "params.local.yaml"
    assert write_local_params(local, {"ingest.source": "/faces", "landmarks.models_root": ""}, params_file)
    data = yaml.safe_load(local.read_text())
    assert data["ingest"] == {"source": "/faces"}
    assert data["landmarks"] == {}  # an empty MODELS leaves the section empty but present
    assert set(data) == set(Params.model_fields)
    assert all(isinstance(v, dict) for v in data.values())

    # A hand-added key survives; the make key is rewritten; identical content leaves the file alone.
    data["ingest"]["max_identities"] = 3
    local.write_text(yaml.safe_dump(data))
    write_local_params(local, {"ingest.source": "/other"}, params_file=params_file)
    assert yaml.safe_load(local.read_text())["ingest"] == {"source": "/other", "max_identities": 3}
    before = local.stat().st_mtime_ns
    assert not write_local_params(local, {"ingest.source": "/other"}, params_file=params_file)
    assert local.stat().st_mtime_ns == before

    # An empty value removes the key, so params.yaml's default applies again.
    write_local_params(local, {"ingest.source": ""}, params_file=params_file)
    assert yaml.safe_load(local.read_text())["ingest"] == {"max_identities": 3}
    assert load_params(params_file).ingest.source == "lfw"

    # A value the stage would reject fails before anything is written.
    with pytest.raises(ConfigError, match=r"ingest\.max_identities"):
        write_local_params(local, {"ingest.max_identities": 0}, params_file=params_file)
    assert yaml.safe_load(local.read_text())["ingest"] == {"max_identities": 3}
