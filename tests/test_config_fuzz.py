"""Random wrong config values are refused before any job runs, with a message naming the key."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import yaml
from helpers.workflow_utils import copy_workflow, digits_tree, snakemake, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgpipe.workflow.config import ConfigError, check_config, load_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "config" / "schema.yaml")
DEFAULT = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def resolve(node: dict) -> dict:
    """Follow a local ``$ref`` of the schema."""
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def leaves(node: dict, prefix: tuple = ()) -> list[tuple[tuple, dict]]:
    """Every settable key of the schema (dotted path, its schema); free-form maps are skipped."""
    node = resolve(node)
    if "properties" not in node:
        return [] if node.get("type") == "object" else [(prefix, node)]
    found = []
    for name, child in node["properties"].items():
        found += leaves(child, (*prefix, name))
    return found


LEAVES = leaves(SCHEMA)
TYPES = {
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def strictly_valid(value, node: dict) -> bool:
    """What the pipeline can use: the schema read strictly (no 2.0 for an integer, no NaN / inf)."""
    node = resolve(node)
    if "enum" in node:
        return any(type(value) is type(ok) and value == ok for ok in node["enum"])
    types = node.get("type")
    types = [types] if isinstance(types, str) else types
    if types and not any(TYPES[t](value) for t in types):
        return False
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int | float):
        return (
            value >= node.get("minimum", -math.inf)
            and value <= node.get("maximum", math.inf)
            and value > node.get("exclusiveMinimum", -math.inf)
            and value < node.get("exclusiveMaximum", math.inf)
        )
    if isinstance(value, str):
        pattern = node.get("pattern")
        return len(value) >= node.get("minLength", 0) and (
            pattern is None or re.search(pattern, value) is not None
        )
    if isinstance(value, list):
        if not node.get("minItems", 0) <= len(value) <= node.get("maxItems", math.inf):
            return False
        if node.get("uniqueItems") and len({repr(v) for v in value}) < len(value):
            return False
        return all(strictly_valid(v, node.get("items", {})) for v in value)
    return True


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-3, 3).map(round),  # integral floats such as 2.0
    st.text(max_size=6),
    st.sampled_from(["rgb", "gray", "demo", "off", "pad", ".png", "png", "", "auto"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)


def with_value(key: tuple, value) -> dict:
    """The shipped config with ``key`` set to ``value``."""
    config = copy.deepcopy(DEFAULT)
    target = config
    for part in key[:-1]:
        target = target.setdefault(part, {})
    target[key[-1]] = value
    return config


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(leaf=st.sampled_from(LEAVES), value=values)
def test_wrong_value_is_refused_naming_the_key(leaf, value):
    key, node = leaf
    if strictly_valid(value, node):
        return
    dotted = ".".join(key)
    with pytest.raises(ConfigError) as err:
        check_config(with_value(key, value), SCHEMA)
    assert re.search(rf"^\s*{re.escape(dotted)}(\.\S+)?:", str(err.value), re.MULTILINE), (
        dotted,
        value,
        str(err.value),
    )


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(sorted(k for k, v in DEFAULT.items() if isinstance(v, dict))),
    name=st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
    value=scalars,
)
def test_unknown_key_is_refused_naming_it(section, name, value):
    if name in SCHEMA["properties"][section].get("properties", {}):
        return
    with pytest.raises(ConfigError, match=rf"{section}\.{name}: unknown key"):
        check_config(with_value((section, name), value), SCHEMA)


def test_every_shipped_leaf_is_strictly_valid():
    for key, node in LEAVES:
        target = DEFAULT
        for part in key:
            target = target.get(part, {}) if isinstance(target, dict) else {}
        if target != {}:
            assert strictly_valid(target, node), ".".join(key)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("fuzz"))
    digits_tree(workdir / "data", per_class=3, classes=2)
    write_config(workdir, {"data": {"root": "data"}})
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--config", "cv={'k': 1}"], "cv.k"),
        (["--config", "image={'size': 'big', 'mode': 'gray'}"], "image.size"),
        (["--config", "train={'lr': .nan}"], "train.lr"),
        (["--config", "ingest={'shards': 2.0}"], "ingest.shards"),
        (["--config", "model={'name': 'smallcnn', 'dropout': 1.5}"], "model.dropout"),
        (["--config", "cv={'k': 'three'}"], "cv.k"),
        (["--config", "sweep={'grid': {'train.lr': [-1, 0.01]}}"], "sweep.grid.train.lr"),
        (["--config", "model={'name': 'resnet9999'}"], "model.name"),
        (["--config", "model={'name': 'os:system'}"], "model.name"),
    ],
)
def test_snakemake_refuses_bad_config_before_any_job(workflow, args, key):
    proc = snakemake(workflow, "-n", *args, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{key}:" in text, text[-2000:]
    assert not (workflow / "results").exists()


@pytest.mark.slow
def test_snakemake_refuses_bad_configfile(workflow, tmp_path):
    bad = yaml.safe_load((workflow / "config" / "config.yaml").read_text())
    bad["split"]["val_fraction"] = "lots"
    bad["bogus"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    proc = snakemake(workflow, "--configfile", str(path), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "split.val_fraction:" in text and "bogus: unknown key" in text, text[-2000:]
    assert not (workflow / "results").exists()
