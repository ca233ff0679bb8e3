"""Configuration validation with messages that name the offending key."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

PACKAGE_DIR = Path(__file__).resolve().parent


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
    scale = config.get("augment", {}).get("scale")
    if isinstance(scale, list) and len(scale) == 2 and scale[0] > scale[1]:
        lines.append("augment.scale: lower bound is above the upper bound")
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


def check_config(config: Mapping, schema: Mapping) -> None:
    """Raise ConfigError listing every bad key, or return when the config is valid."""
    problems = (
        config_errors(config, schema)
        or cross_key_errors(config)
        or sweep_key_errors(config, schema)
    )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


# Modules every script uses (logging, atomic writes, errors): part of every fingerprint.
SHARED_MODULES = ("atomic", "errors", "logs")


def source_fingerprint(modules: Iterable[str]) -> str:
    """Hash the source text of imgpipe modules (content, not mtime) for code-aware caching."""
    digest = hashlib.sha256()
    for name in sorted({*modules, *SHARED_MODULES}):
        path = PACKAGE_DIR / f"{name}.py"
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def local_gpus_present() -> bool:
    """Whether this machine has NVIDIA devices (checked without importing torch)."""
    return Path("/dev/nvidiactl").exists()
