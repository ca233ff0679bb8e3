"""The conda environments in envs/ (used with ``--software-deployment-method conda``).

conda itself is not reachable here, so these tests check what can be checked
without it: each file parses as a conda environment, pins the Python the
project is tested with, installs its packages with pip at exactly the versions
pinned in pyproject.toml, and provides every third-party package that the
scripts assigned to it import (directly or through the imgpipe modules they
use).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ENVS = REPO / "envs"

# Which environment each script's rule runs in (its rule's `conda:` directive).
ENV_OF_SCRIPT = {
    "demo_data": "data",
    "list_images": "data",
    "image_settings": "data",
    "ingest_shard": "data",
    "clean": "data",
    "split": "data",
    "augment": "data",
    "cluster": "train",  # embeddings come from the trained model
    "fetch_weights": "train",  # torchvision, timm and huggingface_hub find the files
    "train_final": "train",
    "sweep_trial": "train",
    "sweep_aggregate": "train",
    "cv_assign": "train",
    "cv_fold": "train",
    "cv_summary": "train",
    "evaluate": "train",
    "export": "train",  # onnx / onnxruntime beside torch
    "predict": "train",
    "report": "report",
    "config_snapshot": "report",
}
# Run by Snakemake itself (outside the envs), so no env needs it.
HOST_ONLY = {"snakemake"}
PIN_RE = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)$")


def canonical(name: str) -> str:
    """Distribution name as pip compares them (case, ``_`` and ``.`` folded to ``-``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_pins() -> dict[str, str]:
    """pyproject.toml's runtime dependencies as {canonical name: version}."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in project["dependencies"]:
        match = PIN_RE.match(line.strip())
        assert match, f"pyproject.toml dependency not pinned with ==: {line!r}"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def load_env(name: str) -> dict:
    """Parse envs/<name>.yaml."""
    return yaml.safe_load((ENVS / f"{name}.yaml").read_text())


def conda_and_pip(env: dict) -> tuple[list[str], list[str]]:
    """The conda specs and the pip requirement lines of an environment."""
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip.extend(dep["pip"])
        else:
            conda.append(dep)
    return conda, pip


def env_pins(name: str) -> dict[str, str]:
    """{canonical name: version} of an environment's pip section (every line must pin ==)."""
    _, pip = conda_and_pip(load_env(name))
    pins = {}
    for line in pip:
        match = PIN_RE.match(line.strip())
        assert match, f"envs/{name}.yaml: pip line not pinned with ==: {line!r}"
        assert canonical(match.group(1)) not in pins, f"envs/{name}.yaml lists {line} twice"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


def imports_of(path: Path) -> set[str]:
    """Top-level names of every absolute import in a Python file (also those inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
            if node.module == "imgpipe":  # from imgpipe import x
                names.update(f"imgpipe.{alias.name}" for alias in node.names)
    return names


def third_party_imports(script: Path) -> set[str]:
    """Third-party top-level modules a script needs, following its imgpipe imports.

    The imgpipe modules are those of the script's code fingerprint (the same
    AST walk, into sub-packages and their ``__init__``), so the two never disagree.
    """
    from imgpipe.workflow.fingerprint import PACKAGE_DIR, import_closure, module_file

    files = [script, PACKAGE_DIR / "__init__.py"]
    files += [module_file(name) for name in import_closure(script)]
    names = set().union(*(imports_of(f) for f in files if f is not None))
    return {
        n
        for n in names
        if "." not in n and n not in sys.stdlib_module_names and n not in {"imgpipe", "__future__"}
    }


def with_requirements(dists: set[str]) -> set[str]:
    """``dists`` and everything pip installs with them (their requirements, transitively)."""
    from packaging.requirements import Requirement

    found, todo = set(), list(dists)
    while todo:
        dist = todo.pop()
        if dist in found:
            continue
        found.add(dist)
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonical(req.name))
    return found


def distributions_of(module_names: set[str]) -> dict[str, set[str]]:
    """{module: canonical distribution names that provide it} (from the installed packages)."""
    providers = importlib.metadata.packages_distributions()
    return {m: {canonical(d) for d in providers.get(m, [])} for m in module_names}


ENV_NAMES = sorted(set(ENV_OF_SCRIPT.values()))


def test_env_files_are_the_ones_the_rules_use():
    assert sorted(p.stem for p in ENVS.glob("*.yaml")) == ENV_NAMES


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_parses_and_pins_python(name):
    env = load_env(name)
    assert env["name"] == f"imgpipe-{name}"
    assert env["channels"][0] == "conda-forge"
    conda, pip = conda_and_pip(env)
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python={python}" in conda, f"envs/{name}.yaml must pin python={python}"
    assert "pip" in conda and pip, f"envs/{name}.yaml installs its packages with pip"


@pytest.mark.parametrize("name", ENV_NAMES)
def test_env_pins_the_versions_of_pyproject(name):
    pins, project = env_pins(name), project_pins()
    for package, version in pins.items():
        assert package in project, f"envs/{name}.yaml: {package} is not a pyproject dependency"
        assert version == project[package], (
            f"envs/{name}.yaml pins {package}=={version}, pyproject.toml {project[package]}"
        )


def test_every_dependency_is_in_some_env():
    covered = set().union(*(env_pins(name) for name in ENV_NAMES))
    missing = set(project_pins()) - covered - HOST_ONLY
    assert not missing, f"pyproject dependencies in no env: {sorted(missing)}"


def test_every_script_has_an_env():
    scripts = sorted(p.stem for p in (REPO / "scripts").glob("*.py"))
    unassigned = [s for s in scripts if s not in ENV_OF_SCRIPT]
    assert not unassigned, (
        f"scripts without an environment: {unassigned}: add them to ENV_OF_SCRIPT in "
        "tests/test_envs.py and a conda: directive to their rules"
    )


@pytest.mark.parametrize(
    "script", sorted(s for s in ENV_OF_SCRIPT if (REPO / "scripts" / f"{s}.py").exists())
)
def test_env_provides_what_the_script_imports(script):
    env = ENV_OF_SCRIPT[script]
    provided = with_requirements(set(env_pins(env)))
    needed = distributions_of(third_party_imports(REPO / "scripts" / f"{script}.py"))
    unknown = sorted(m for m, dists in needed.items() if not dists)
    assert not unknown, (
        f"scripts/{script}.py imports {unknown}, which no installed package provides"
    )
    missing = {m: sorted(d) for m, d in needed.items() if not d & provided}
    assert not missing, f"envs/{env}.yaml lacks what scripts/{script}.py imports: {missing}"


def test_requirements_of_pinned_packages_count_as_provided():
    # scikit-learn always brings threadpoolctl and joblib; numpy brings nothing of them.
    assert {"threadpoolctl", "joblib", "scipy"} <= with_requirements({"scikit-learn"})
    assert "threadpoolctl" not in with_requirements({"numpy"})


def test_import_scan_follows_imgpipe_modules(tmp_path):
    """The scan sees imports inside functions and through imgpipe modules."""
    script = tmp_path / "demo.py"
    script.write_text("from imgpipe.stages.demo import write_digits_tree\n")
    found = third_party_imports(script)
    # imgpipe/stages/demo.py imports cv2 inside a function and sklearn inside another.
    assert {"cv2", "sklearn", "numpy"} <= found
    assert "os" not in found and "imgpipe" not in found
