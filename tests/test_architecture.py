"""The package's shape: no import cycle among imgpipe modules, one home per concept."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    """``imgpipe/a/b.py`` -> ``imgpipe.a.b``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement of the module names, at any depth (inside functions too)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from ..y import z
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from imgpipe.x import y`: y is a module of imgpipe.x or a name in it.
            names.extend(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from a.b import c`` resolves to a.b.c or a.b)."""
    root = package.parent
    paths = {module_name(p, root): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for dotted in imported_names(tree, name, path.name == "__init__.py"):
            target = dotted
            while target and target not in paths:
                target = target.rpartition(".")[0]
            # The package itself (its __init__) only holds the version: not an edge.
            if target and target != name and target != package.name:
                graph[name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules that import each other (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle_among_imgpipe_modules():
    graph = import_graph(ROOT / "imgpipe")
    assert "imgpipe.learn.jobs" in graph and graph["imgpipe.learn.jobs"]
    cycles = import_cycles(graph)
    assert not cycles, f"modules importing each other (inside functions too): {cycles}"


def test_the_cycle_check_sees_cycles_through_sub_packages_and_function_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub.b import thing\n")
    (package / "sub" / "b.py").write_text("def thing():\n    from pkg import c\n")
    (package / "c.py").write_text("from .a import x\n")
    (package / "d.py").write_text("import pkg.a\n")
    graph = import_graph(package)
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_gpu_facts_import_without_torch():
    """The Snakefile asks imgpipe.learn.gpus while it builds the DAG: neither it nor config pulls in torch."""
    code = (
        "import sys, imgpipe.workflow.config, imgpipe.learn.gpus, imgpipe.learn.monitor\n"
        "imgpipe.learn.gpus.local_gpus_present()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_launch_imports_no_lightning_before_its_ranks_set_up_logging():
    """launch.main configures logging before Lightning is imported (else Lightning adds its own handler)."""
    code = (
        "import sys, imgpipe.learn.launch\n"
        "assert not {'torch', 'pytorch_lightning'} & set(sys.modules), 'imported too early'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_every_gpu_fact_lives_in_gpus():
    from imgpipe.learn import gpus
    from imgpipe.learn import trainer as training
    from imgpipe.workflow import config

    for name in ("local_gpus_present", "count_gpus", "gpu_supports_bf16"):
        assert getattr(gpus, name).__module__ == "imgpipe.learn.gpus"
    assert not hasattr(config, "local_gpus_present")
    assert training.gpu_supports_bf16 is gpus.gpu_supports_bf16


@pytest.mark.parametrize(("metric", "mode"), [("val_acc", "max"), ("val_loss", "min")])
def test_one_direction_per_metric_for_training_and_the_sweep(metric, mode):
    import pandas as pd

    from imgpipe.learn.monitor import metric_mode
    from imgpipe.learn.sweep import rank_trials, tie_breaker
    from imgpipe.learn.trainer import monitor_mode

    assert metric_mode(metric) == mode
    assert monitor_mode({"monitor": metric}) == (metric, mode)
    assert metric_mode(tie_breaker(metric)) != mode
    trials = pd.DataFrame({"trial": ["a", "b"], metric: [0.2, 0.8]})
    best = rank_trials(trials, metric).iloc[0]["trial"]
    assert best == ("b" if mode == "max" else "a")


def test_metric_mode_refuses_a_metric_without_a_direction():
    from imgpipe.learn.monitor import metric_mode

    with pytest.raises(ValueError, match="val_f1"):
        metric_mode("val_f1")


# ----------------------------------------------------------------------------- the tree


def test_stage_modules_are_imported_only_by_entry_points():
    """Stages import libraries, never the reverse: only other stages and the CLI import a stage."""
    graph = import_graph(ROOT / "imgpipe")
    allowed = ("imgpipe.stages", "imgpipe.cli")
    wrong = {
        module: sorted(t for t in targets if t.startswith("imgpipe.stages."))
        for module, targets in graph.items()
        if not module.startswith(allowed)
    }
    wrong = {module: targets for module, targets in wrong.items() if targets}
    assert not wrong, f"library modules importing a stage: {wrong}"


def rule_scripts() -> dict[str, str]:
    """scripts/<name>.py -> the rule file (workflow/rules/<stage>.smk) whose rule runs it."""
    found = {}
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for script in re.findall(r'^\s*"\.\./\.\./scripts/(\w+\.py)"', smk.read_text(), re.M):
            found[script] = smk.stem
    return found


def test_every_script_calls_the_stage_module_of_its_rule_file():
    scripts = rule_scripts()
    assert len(scripts) >= 19
    # config_snapshot (in report.smk) keeps its own module: its code fingerprint then
    # leaves out the page code, so editing the report does not rewrite the snapshot.
    own_module = {"config_snapshot.py": "config_snapshot"}
    for script, rule_file in scripts.items():
        tree = ast.parse((ROOT / "scripts" / script).read_text(encoding="utf-8"))
        stages = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imgpipe.stages")
        }
        expected = f"imgpipe.stages.{own_module.get(script, rule_file)}"
        assert stages == {expected}, f"scripts/{script} ({rule_file}.smk) imports {stages}"


# Modules allowed past ~600 lines, and why (the rest stay under it).
LONG_MODULES = {}


def test_no_module_is_over_about_600_lines_unless_said_why():
    long = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in (ROOT / "imgpipe").rglob("*.py")
    }
    over = {path: n for path, n in long.items() if n > 650 and path not in LONG_MODULES}
    assert not over, f"modules over 650 lines: {over}"
