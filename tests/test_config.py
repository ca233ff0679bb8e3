"""The config schema refuses bad keys and values with a message naming the key."""

import copy
from pathlib import Path

import pytest
import yaml

from imgpipe.config import ConfigError, check_config, config_errors, load_schema

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
