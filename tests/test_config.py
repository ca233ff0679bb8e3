"""The config schema refuses bad keys and values with a message naming the key."""

import copy
from pathlib import Path

import pytest
import yaml

from imgpipe.workflow.config import (
    ConfigError,
    check_config,
    coerce_config,
    config_errors,
    load_schema,
    subschema,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = load_schema(ROOT / "config" / "schema.yaml")


def default_config():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def test_shipped_config_is_valid():
    check_config(default_config(), SCHEMA)


def documented_configs() -> list[tuple[str, dict]]:
    """Every YAML block of the README and docs/ that holds a data section: a config to try."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in doc.read_text().split("```yaml\n")[1:]:
            parsed = yaml.safe_load(block.split("```", 1)[0])
            if isinstance(parsed, dict) and "data" in parsed:
                found.append((doc.name, parsed))
    return found


def test_configs_in_the_docs_are_valid():
    configs = documented_configs()
    assert {name for name, _ in configs} >= {"README.md", "photos.md"}
    for name, config in configs:
        try:
            check_config(config, SCHEMA)
        except ConfigError as err:
            pytest.fail(f"a config in {name}: {err}")


@pytest.mark.parametrize(
    ("section", "key", "value", "named"),
    [
        ("image", "mode", "cmyk", "image.mode"),
        ("image", "size", "big", "image.size"),
        ("train", "lr", -1, "train.lr"),
        ("train", "optimizer", "adam9", "train.optimizer"),
        ("clean", "near_duplicates", "maybe", "clean.near_duplicates"),
        ("cv", "k", 1, "cv.k"),
        ("split", "test_fraction", 1.5, "split.test_fraction"),
        ("cluster", "export", "move", "cluster.export"),
    ],
)
def test_bad_value_is_named(section, key, value, named):
    config = default_config()
    config[section][key] = value
    errors = config_errors(config, SCHEMA)
    assert any(line.startswith(f"{named}:") for line in errors), errors


def test_unknown_keys_are_named_at_any_depth():
    config = default_config()
    config["train"]["learning_rate"] = 0.1
    config["bogus"] = 1
    config["augment"]["spin"] = True
    errors = config_errors(config, SCHEMA)
    assert "train.learning_rate: unknown key" in errors
    assert "bogus: unknown key" in errors
    assert "augment.spin: unknown key" in errors


def test_cross_key_rules():
    config = default_config()
    config["split"]["test_fraction"] = 0.6
    config["split"]["val_fraction"] = 0.5
    with pytest.raises(ConfigError, match="split.val_fraction"):
        check_config(config, SCHEMA)
    config = default_config()
    config["augment"]["scale"] = [1.2, 0.8]
    with pytest.raises(ConfigError, match="augment.scale"):
        check_config(config, SCHEMA)


def test_sweep_grid_keys_must_be_train_or_model():
    config = default_config()
    config["sweep"]["grid"] = {"clean.blur": [0.1]}
    errors = config_errors(config, SCHEMA)
    assert any(line.startswith("sweep.grid") for line in errors), errors


def test_check_config_does_not_mutate():
    config = default_config()
    before = copy.deepcopy(config)
    check_config(config, SCHEMA)
    assert config == before


def test_sweep_keys_must_name_a_setting():
    config = default_config()
    config["sweep"]["grid"] = {"train.learning_rate": [0.1]}
    with pytest.raises(ConfigError, match="sweep.grid.train.learning_rate"):
        check_config(config, SCHEMA)


# ----------------------------------------------------------------- --config strings (issue 19)


@pytest.mark.parametrize(
    ("section", "given", "expected"),
    [
        ("cv", {"k": "3"}, {"k": 3}),
        ("cv", {"adapt_k": "true"}, {"adapt_k": True}),
        ("train", {"lr": "0.5", "weight_decay": "1e-4"}, {"lr": 0.5, "weight_decay": 1e-4}),
        ("train", {"freeze": "2", "threads": "null"}, {"freeze": 2, "threads": None}),
        (
            "train",
            {"freeze": "backbone", "precision": "32-true"},
            {"freeze": "backbone", "precision": "32-true"},
        ),
        ("image", {"size": "64", "mode": "auto"}, {"size": 64, "mode": "auto"}),
        ("image", {"size": "auto"}, {"size": "auto"}),
        ("data", {"root": "123", "test_root": "null"}, {"root": "123", "test_root": None}),
        (
            "augment",
            {"scale": ["0.8", "1.2"], "hflip": "False"},
            {"scale": [0.8, 1.2], "hflip": False},
        ),
        (
            "clean",
            {"near_duplicates": "off", "blur": "null"},
            {"near_duplicates": "off", "blur": None},
        ),
        ("model", {"channels": ["8", "16"]}, {"channels": [8, 16]}),
    ],
)
def test_strings_are_read_as_the_declared_type(section, given, expected):
    config = {"data": {"root": "demo"}, section: given}
    coerced = coerce_config(config, SCHEMA)
    assert coerced[section] == {**coerced[section], **expected}
    for key, value in expected.items():
        assert type(coerced[section][key]) is type(value), (key, coerced[section][key])
    check_config(coerced, SCHEMA)
    assert config[section] == given  # the input is not changed


def test_a_string_that_does_not_parse_stays_and_is_named():
    coerced = coerce_config({"data": {"root": "demo"}, "cv": {"k": "three"}}, SCHEMA)
    assert coerced["cv"]["k"] == "three"
    with pytest.raises(ConfigError, match=r"cv\.k: 'three' is not of type 'integer'"):
        check_config(coerced, SCHEMA)


def test_a_parsed_value_out_of_range_is_reported_as_a_number():
    coerced = coerce_config({"data": {"root": "demo"}, "cv": {"k": "1"}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"cv\.k: 1 is less than the minimum of 2"):
        check_config(coerced, SCHEMA)


def test_integral_strings_stay_strict():
    # "2.0" for an integer parses as a float, which the strict validator refuses.
    coerced = coerce_config({"data": {"root": "demo"}, "ingest": {"shards": "2.0"}}, SCHEMA)
    with pytest.raises(ConfigError, match=r"ingest\.shards:"):
        check_config(coerced, SCHEMA)


def test_sweep_values_are_read_as_the_type_of_the_key_they_set():
    config = {
        "data": {"root": "demo"},
        "sweep": {
            "grid": {
                "train.lr": ["0.01", "0.1"],
                "train.max_epochs": ["2"],
                "model.name": ["smallcnn"],
            },
            "ranges": {"train.lr": ["1e-4", "0.1"], "train.deterministic": ["true", "false"]},
        },
    }
    sweep = coerce_config(config, SCHEMA)["sweep"]
    assert sweep["grid"] == {
        "train.lr": [0.01, 0.1],
        "train.max_epochs": [2],
        "model.name": ["smallcnn"],
    }
    assert sweep["ranges"] == {"train.lr": [1e-4, 0.1], "train.deterministic": [True, False]}


def test_coercion_follows_one_of_and_any_of():
    schema = {
        "type": "object",
        "properties": {
            "n": {"oneOf": [{"enum": ["auto"]}, {"type": "integer", "minimum": 1}]},
            "x": {"anyOf": [{"type": "null"}, {"type": "number"}]},
        },
    }
    assert coerce_config({"n": "4", "x": "null"}, schema) == {"n": 4, "x": None}
    assert coerce_config({"n": "auto", "x": "0.5"}, schema) == {"n": "auto", "x": 0.5}


def test_subschema_by_dotted_key():
    assert subschema(SCHEMA, "train.lr")["exclusiveMinimum"] == 0
    assert subschema(SCHEMA, "train.max_epochs")["minimum"] == 1  # through a $ref
    assert subschema(SCHEMA, "train.nope") is None


# ----------------------------------------------------------------- sweep values and model names


@pytest.mark.parametrize(
    ("part", "key", "values", "named"),
    [
        ("grid", "train.lr", [-1, 0.01], "sweep.grid.train.lr: -1 is less than or equal"),
        ("grid", "train.optimizer", ["adam9"], "sweep.grid.train.optimizer: 'adam9' is not one of"),
        ("grid", "model.dropout", [0.1, 1.5], "sweep.grid.model.dropout: 1.5"),
        ("grid", "train.max_epochs", [2.0], "sweep.grid.train.max_epochs: 2.0 is not of type"),
        ("ranges", "train.lr", [0.0, 0.1], "sweep.ranges.train.lr: 0.0 is less than or equal"),
        ("ranges", "train.momentum", [0.5, 1.0], "sweep.ranges.train.momentum: 1.0"),
        (
            "grid",
            "model.name",
            ["smallcnn", "resnet9999"],
            "sweep.grid.model.name: unknown model 'resnet9999'",
        ),
    ],
)
def test_sweep_values_are_checked_against_the_key_they_set(part, key, values, named):
    config = default_config()
    config["sweep"]["method"] = "grid" if part == "grid" else "random"
    config["sweep"][part] = {key: values}
    with pytest.raises(ConfigError) as err:
        check_config(config, SCHEMA)
    assert named in str(err.value), str(err.value)


def test_valid_sweep_values_pass():
    config = default_config()
    config["sweep"]["grid"] = {"train.lr": [0.001, 0.01], "model.name": ["smallcnn", "resnet18"]}
    config["sweep"]["ranges"] = {"train.lr": [0.0001, 0.1], "train.optimizer": ["adamw", "sgd"]}
    check_config(config, SCHEMA)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet9999", r"model\.name: unknown model 'resnet9999' .*close: resnet"),
        ("timm/resnet9999", r"model\.name: timm has no model 'resnet9999'"),
        ("os:system", r"model\.name: os:system names Python's standard library"),
        ("json.decoder:JSONDecoder", r"model\.name: .*standard library"),
        ("no_such_package.nets:make", r"model\.name: cannot import no_such_package\.nets:make"),
        (
            "helpers.custom_nets:no_such_factory",
            r"model\.name: cannot import helpers.custom_nets:no_such_factory",
        ),
        ("helpers.custom_nets:TinyNet.forward", r"model\.name: unknown model"),
        (
            "helpers.custom_nets:WIDTH",
            r"model\.name: helpers.custom_nets:WIDTH is a int, not a callable",
        ),
        (
            "helpers.custom_nets:takes_one",
            r"model\.name: helpers.custom_nets:takes_one cannot be called as takes_one",
        ),
    ],
)
def test_bad_model_names_are_refused_at_start_up(name, message):
    config = default_config()
    config["model"]["name"] = name
    with pytest.raises(ConfigError, match=message):
        check_config(config, SCHEMA)


@pytest.mark.parametrize(
    "name", ["smallcnn", "resnet18", "timm/resnet10t", "helpers.custom_nets:make"]
)
def test_known_model_names_pass(name):
    config = default_config()
    config["model"]["name"] = name
    check_config(config, SCHEMA)
