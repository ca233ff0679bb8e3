"""imgpipe.workflow.settings: the schema is the one place defaults live, and no module writes them again."""

import ast
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from imgpipe.images.quality import CleanSettings
from imgpipe.workflow import settings
from imgpipe.workflow.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imgpipe"
SCHEMA = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text(encoding="utf-8"))

# The modules allowed to hold defaults: the schema's reader and the validation it reuses.
SETTINGS_CODE = {"imgpipe/workflow/settings.py", "imgpipe/workflow/config.py"}
# Nothing is excluded: the report package is checked like the rest.
EXCLUDED: set[str] = set()
# (module, key): .get fallbacks about file versions, not config defaults. Each is a model
# file or an older results file that may lack the key; the comment at the call says which.
ALLOWED = {
    # Model files written before smallcnn had a stem have no model_cfg.stem (layout none).
    ("imgpipe/infer/modelfile.py", "stem"),
    # A model file's normalisation.scale (a metadata key that shares augment.scale's name).
    ("imgpipe/infer/export.py", "scale"),
}


def schema_keys() -> set[str]:
    """Every key config/schema.yaml names: the sections and the keys inside them."""
    keys = set(SCHEMA["properties"])
    for node in SCHEMA["properties"].values():
        keys |= set(node.get("properties", {}))
    return keys


def defaulted_gets(path: Path, keys: set[str]) -> list[tuple[int, str]]:
    """(line, key) of every ``x.get("<schema key>", <default>)`` call in a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value in keys
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_no_module_writes_a_schema_default_again():
    keys = schema_keys()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name in SETTINGS_CODE or name in EXCLUDED:
            continue
        offenders += [
            f"{name}:{line}: .get({key!r}, ...)"
            for line, key in defaulted_gets(path, keys)
            if (name, key) not in ALLOWED
        ]
    assert not offenders, "schema defaults written again:\n" + "\n".join(offenders)


def test_the_ast_check_finds_a_defaulted_get(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('def f(cfg):\n    return cfg.get("lr", 0.1), cfg.get("lr"), d.get("x", 1)\n')
    assert defaulted_gets(source, schema_keys()) == [(2, "lr")]


def test_schema_keys_agree_with_the_test_s_own_reading():
    assert settings.schema_keys() == schema_keys()


@pytest.mark.parametrize("section", sorted(settings.SECTIONS))
def test_each_dataclass_has_one_field_per_schema_key(section):
    declared = set(SCHEMA["properties"][section]["properties"])
    assert {f.name for f in fields(settings.SECTIONS[section])} == declared


def test_clean_settings_cover_the_decision_keys():
    declared = set(SCHEMA["properties"]["clean"]["properties"])
    assert {f.name for f in fields(CleanSettings)} == declared
    section = settings.filled("clean")
    assert CleanSettings.from_config(section).blur == section["blur"]
    del section["blur"]
    with pytest.raises(KeyError, match="blur"):
        CleanSettings.from_config(section)


def test_section_defaults_come_from_the_schema():
    defaults = settings.section_defaults("train")
    for key, node in SCHEMA["properties"]["train"]["properties"].items():
        assert defaults[key] == node["default"], key


def test_filled_keeps_given_values_and_fills_the_rest():
    section = settings.filled("augment", {"rotation": 3.0})
    assert section["rotation"] == 3.0
    assert section["crop_ratio"] == [0.75, 1.333]
    assert section["on_device"] is True


def test_filled_returns_a_copy_and_never_shares_the_schema_s_lists():
    first = settings.filled("data", {"root": "x"})
    first["extensions"].append(".zzz")
    assert ".zzz" not in settings.filled("data", {"root": "x"})["extensions"]


def test_filled_refuses_a_value_the_schema_refuses():
    with pytest.raises(ConfigError, match="lr"):
        settings.filled("train", {"lr": -1}, check=True)


def test_fill_defaults_fills_sections_the_config_leaves_out():
    config = settings.fill_defaults({"data": {"root": "demo"}})
    assert config["train"]["lr"] == SCHEMA["properties"]["train"]["properties"]["lr"]["default"]
    assert config["image"]["fit"] == "pad"
    assert "predict" not in config  # no default: a default would create the predict rule


def test_a_dataclass_is_built_from_a_filled_section():
    train = settings.TrainSettings.from_config(settings.filled("train", {"lr": 0.1}))
    assert train.lr == 0.1
    assert train.schedule == "onecycle"


def test_a_missing_key_raises_instead_of_falling_back():
    section = settings.filled("model")
    del section["dropout"]
    with pytest.raises(KeyError, match="dropout"):
        settings.ModelSettings.from_config(section)


def test_dataclass_fields_have_no_default_of_their_own():
    for cls in [*settings.SECTIONS.values(), CleanSettings]:
        with pytest.raises(TypeError):
            cls()
