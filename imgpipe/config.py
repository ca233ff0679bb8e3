"""Configuration validation with messages that name the offending key."""

from __future__ import annotations

import ast
import functools
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


def check_config(config: Mapping, schema: Mapping) -> None:
    """Raise ConfigError listing every bad key, or return when the config is valid."""
    problems = (
        config_errors(config, schema)
        or cross_key_errors(config)
        or sweep_key_errors(config, schema)
    )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


# The final model's process layout: sweep trials and k-fold jobs always train in
# one process on one node, so these train keys are not part of their params and
# changing them reruns train_final alone (imgpipe.experiment.job_sections).
LAYOUT_KEYS = ("num_nodes", "gpus_per_node", "cpu_devices", "threads", "num_workers")


# ----------------------------------------------------------------------------- code fingerprints


def imported_modules(path: str | Path) -> set[str]:
    """imgpipe modules a Python file imports anywhere (top level or inside functions), by AST."""
    stat = Path(path).stat()
    return set(_imported_modules(str(path), stat.st_mtime_ns, stat.st_size))


# Every rule's fingerprint walks the same modules: parse each file once per
# version of it (keyed by mtime and size), not once per rule.
@functools.cache
def _imported_modules(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "imgpipe" and len(parts) >= 2:
                found.add(parts[1])
    return frozenset(name for name in found if (PACKAGE_DIR / f"{name}.py").is_file())


def import_closure(path: str | Path) -> list[str]:
    """Every imgpipe module ``path`` runs: its imports, their imports, and so on (sorted)."""
    seen: set[str] = set()
    todo = sorted(imported_modules(path))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(PACKAGE_DIR / f"{name}.py") - seen)
    return sorted(seen)


def code_fingerprint(script: str | Path) -> str:
    """Hash of a rule's script and the source of every imgpipe module it imports, transitively.

    A rule whose params hold this reruns after any edit of code it runs (and
    only then): the import closure is computed from the source, never kept by hand.
    """
    digest = hashlib.sha256()
    digest.update(Path(script).read_bytes())
    for name in ["__init__", *import_closure(script)]:
        digest.update(name.encode())
        digest.update((PACKAGE_DIR / f"{name}.py").read_bytes())
    return digest.hexdigest()[:16]


def local_gpus_present() -> bool:
    """Whether this machine has NVIDIA devices (checked without importing torch)."""
    return Path("/dev/nvidiactl").exists()
