"""Configuration validation with messages that name the offending key."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ConfigError(ValueError):
    """A configuration value the schema or a cross-key rule refuses."""


def load_schema(path: str | Path) -> dict:
    """Read a YAML JSON-schema file."""
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def dotted(path: Iterable[Any]) -> str:
    """Join a jsonschema error path into a dotted key such as ``train.lr``."""
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(checker: Any, instance: Any) -> bool:
    return (
        isinstance(instance, int | float)
        and not isinstance(instance, bool)
        and math.isfinite(instance)
    )


# JSON schema counts 2.0 as an integer and NaN / inf as numbers (NaN even passes every
# bound): the code then fails far from the config (range(2.0)) or trains on NaN.
StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"integer": _is_integer, "number": _is_number}
    ),
)


def config_errors(config: Mapping, schema: Mapping) -> list[str]:
    """Return one ``key: problem`` line per schema violation, sorted by key."""
    validator = StrictValidator(schema)
    lines = []
    for error in validator.iter_errors(config):
        key = dotted(error.absolute_path)
        if error.validator == "additionalProperties":
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            for name in extra:
                unknown = f"{key}.{name}" if error.absolute_path else name
                lines.append(f"{unknown}: unknown key")
            continue
        if error.validator == "propertyNames":
            lines.append(f"{key}: {error.message}")
            continue
        lines.append(f"{key}: {error.message}")
    return sorted(set(lines))


def cross_key_errors(config: Mapping) -> list[str]:
    """Return problems that involve more than one key (the schema cannot express them)."""
    lines = []
    for key in ("scale", "crop_area", "crop_ratio"):
        bounds = config.get("augment", {}).get(key)
        if isinstance(bounds, list) and len(bounds) == 2 and bounds[0] > bounds[1]:
            lines.append(f"augment.{key}: lower bound is above the upper bound")
    split = config.get("split", {})
    if split.get("test_fraction", 0) + split.get("val_fraction", 0) >= 1:
        lines.append("split.val_fraction: test_fraction + val_fraction must stay below 1")
    for key, bounds in (config.get("sweep", {}).get("ranges") or {}).items():
        if len(bounds) == 2 and all(isinstance(b, int | float) for b in bounds):
            if bounds[0] > bounds[1]:
                lines.append(f"sweep.ranges.{key}: lower bound is above the upper bound")
    return lines


def sweep_key_errors(config: Mapping, schema: Mapping) -> list[str]:
    """Sweep grid / range keys that name no ``train`` or ``model`` setting of the schema."""
    sweep = config.get("sweep", {})
    lines = []
    for part in ("grid", "ranges"):
        for key in sweep.get(part) or {}:
            section, _, name = key.partition(".")
            known = schema["properties"].get(section, {}).get("properties", {})
            if section in ("train", "model") and name not in known:
                lines.append(f"sweep.{part}.{key}: {section} has no setting {name!r}")
    return lines


def subschema(schema: Mapping, key: str) -> dict | None:
    """The schema of the dotted config key ``key`` (``train.lr``), with the root's ``$defs``.

    None when the schema has no such key.
    """
    node: Mapping = schema
    for part in key.split("."):
        node = resolve_ref(schema, node).get("properties", {}).get(part)
        if node is None:
            return None
    return {**resolve_ref(schema, node), "$defs": schema.get("$defs", {})}


def resolve_ref(schema: Mapping, node: Mapping) -> Mapping:
    """Follow a node's local ``$ref`` (``#/$defs/name``) to the definition, merged with its siblings."""
    while "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        node = {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def value_errors(value: Any, node: Mapping) -> list[str]:
    """The schema's complaints about one value checked against one key's schema (strict types)."""
    return [error.message for error in StrictValidator(node).iter_errors(value)]


def sweep_value_errors(config: Mapping, schema: Mapping) -> list[str]:
    """Grid values and range ends the schema of the key they set refuses (and unknown model names).

    A trial takes its values from the sweep, not from the checked sections, so
    without this a bad value failed only inside its trial.
    """
    sweep = config.get("sweep", {})
    lines = []
    for part in ("grid", "ranges"):
        for key, values in (sweep.get(part) or {}).items():
            node = subschema(schema, key)
            if node is None:
                continue  # sweep_key_errors names it
            for value in values:
                problems = value_errors(value, node)
                if not problems and key == "model.name":
                    error = model_name_error(value)
                    problems = [str(error).removeprefix("model.name: ")] if error else []
                lines += [f"sweep.{part}.{key}: {problem}" for problem in problems]
    return lines


def model_name_error(name: str) -> str | None:
    """Why ``model.name`` names no model that can be built (None when it does).

    Imported here, not at the top: torchvision and timm load only for names that
    need their registries, so a smallcnn config keeps Snakemake's start-up fast.
    """
    from imgpipe.learn import model_names

    error = model_names.model_name_error(name)
    return None if error is None else str(error)


def _set_defaults(validator: Any, properties: Mapping, instance: Any, node: Mapping) -> Iterator:
    # What Snakemake's validate(..., set_default=True) does (jsonschema's FAQ recipe): every
    # property with a default that the instance lacks is set, then validated as usual, so the
    # defaults of a section that was itself just set ({}) are filled in too.
    if isinstance(instance, dict):
        for name, child in properties.items():
            if "default" in child:
                instance.setdefault(name, copy.deepcopy(child["default"]))
    yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](
        validator, properties, instance, node
    )


DefaultFillingValidator = jsonschema.validators.extend(
    StrictValidator, {"properties": _set_defaults}
)


def with_defaults(config: Mapping, schema: Mapping) -> dict:
    """A copy of ``config`` with the schema's defaults filled in, unchecked (imgpipe.workflow.settings
    builds on it; here for the start-up checks that run before Snakemake fills them)."""
    filled = copy.deepcopy(dict(config))
    for _ in DefaultFillingValidator(schema).iter_errors(filled):
        pass
    return filled


def model_errors(config: Mapping, schema: Mapping) -> list[str]:
    """``model.name`` and named ``model.weights`` checked at start-up, not when a trial builds the model."""
    name = config.get("model", {}).get("name")
    error = model_name_error(name) if isinstance(name, str) else None
    if error:
        return [error]
    # Imported here for the same reason: only names of weights need the registries.
    from imgpipe.learn.pretrained import config_weights_errors

    return config_weights_errors(with_defaults(config, schema))


def check_config(config: Mapping, schema: Mapping) -> None:
    """Raise ConfigError listing every bad key, or return when the config is valid."""
    problems = (
        config_errors(config, schema)
        or cross_key_errors(config)
        or sweep_key_errors(config, schema)
        or sweep_value_errors(config, schema)
        or model_errors(config, schema)
    )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- --config strings

# Snakemake reads nested --config values (cv='{"k": 3}') with YAML's BaseLoader:
# every scalar arrives as a string. These turn such a string into the type the
# schema declares for its key; a string that does not parse stays a string, so
# the schema's message names the key.
NULL_WORDS = ("null", "Null", "NULL", "~")
INTEGER_RE = re.compile(r"^[-+]?\d+$")


def _parse_integer(text: str) -> int | None:
    return int(text) if INTEGER_RE.match(text.strip()) else None


def _parse_number(text: str) -> float | int | None:
    whole = _parse_integer(text)
    if whole is not None:
        return whole
    try:
        return float(text)
    except ValueError:
        return None


def _parse_boolean(text: str) -> bool | None:
    return {"true": True, "false": False}.get(text.strip().lower())


PARSERS = {"integer": _parse_integer, "number": _parse_number, "boolean": _parse_boolean}


def declared_types(schema: Mapping, node: Mapping) -> list[str]:
    """Every JSON type a key's schema allows (its type, its enum's values, oneOf / anyOf branches)."""
    node = resolve_ref(schema, node)
    types = node.get("type", [])
    found = [types] if isinstance(types, str) else list(types)
    names = {bool: "boolean", int: "integer", float: "number", type(None): "null", str: "string"}
    found += [names.get(type(value), "string") for value in node.get("enum", [])]
    for branch in node.get("oneOf", []) + node.get("anyOf", []):
        found += declared_types(schema, branch)
    return list(dict.fromkeys(found))


def coerce_scalar(text: str, schema: Mapping, node: Mapping) -> Any:
    """``text`` as the type its key declares, or ``text`` itself when it is valid or parses as none.

    A string the key accepts stays a string (``auto``), except a null word where
    null is allowed (``test_root: null`` arrives as ``'null'``). Of the parsed
    candidates the first one the key accepts wins, else the first one parsed, so
    that ``cv.k: '1'`` reports ``1 is less than the minimum of 2``.
    """
    types = declared_types(schema, node)
    if "null" in types and text in NULL_WORDS:
        return None
    full = {**resolve_ref(schema, node), "$defs": schema.get("$defs", {})}
    if not value_errors(text, full):
        return text
    candidates = [
        parsed for kind in types if kind in PARSERS and (parsed := PARSERS[kind](text)) is not None
    ]
    for candidate in candidates:
        if not value_errors(candidate, full):
            return candidate
    return candidates[0] if candidates else text


def coerce_strings(value: Any, schema: Mapping, node: Mapping | None = None) -> Any:
    """A copy of ``value`` (a config or part of it) with its strings read as their keys' types.

    Walks the schema beside the value: object properties, array items, and the
    sweep's grid / ranges, whose values take the schema of the key they set.
    Keys the schema does not know are copied unchanged (the schema names them).
    """
    node = resolve_ref(schema, schema if node is None else node)
    if isinstance(value, str):
        return coerce_scalar(value, schema, node)
    if isinstance(value, list):
        items = node.get("items")
        return [coerce_strings(v, schema, items) if items else v for v in value]
    if isinstance(value, Mapping):
        properties = node.get("properties", {})
        return {
            key: coerce_strings(child, schema, properties[key]) if key in properties else child
            for key, child in value.items()
        }
    return value


def coerce_config(config: Mapping, schema: Mapping) -> dict:
    """The config with every string read as its key's declared type (see coerce_strings).

    Run on the merged config right before validation, and only there.
    """
    coerced = coerce_strings(config, schema)
    sweep = coerced.get("sweep")
    if isinstance(sweep, dict):
        for part in ("grid", "ranges"):
            if isinstance(sweep.get(part), dict):
                sweep[part] = {
                    key: coerce_swept(values, key, schema) for key, values in sweep[part].items()
                }
    return coerced


def coerce_swept(values: Any, key: str, schema: Mapping) -> Any:
    """A sweep's list of values for ``key``, each read as the type ``key`` declares."""
    node = subschema(schema, key)
    if node is None or not isinstance(values, list):
        return values
    return [coerce_strings(value, schema, node) for value in values]


# The final model's process layout: sweep trials and k-fold jobs always train in
# one process on one node, so these train keys are not part of their params and
# changing them reruns train_final alone (imgpipe.learn.jobs.job_sections).
LAYOUT_KEYS = ("num_nodes", "gpus_per_node", "cpu_devices", "threads", "num_workers")
