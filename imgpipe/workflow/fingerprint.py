"""Code fingerprints: a rule's script and every imgpipe module it runs, hashed from the source.

A rule whose params hold :func:`code_fingerprint` reruns after any edit of code
it runs, and only then. The import closure is computed from the source (by
AST), never kept by hand; it follows dotted imports into sub-packages
(``from imgpipe.learn import models``, ``import imgpipe.learn.models``) and
counts each package's ``__init__`` on the way, since importing a module runs it,
with the package's files that are not Python (the report's templates).
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The source file of imgpipe module ``name`` (dotted below imgpipe: ``learn.models``), or None."""
    base = PACKAGE_DIR.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_packages(name: str) -> set[str]:
    """``learn.models`` and the packages importing it runs: ``learn``."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _module_of(path: Path) -> str | None:
    """The dotted name (below imgpipe) of a file inside the package, or None outside it."""
    try:
        relative = path.resolve().relative_to(PACKAGE_DIR)
    except ValueError:
        return None
    parts = list(relative.with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or None


def imported_modules(path: str | Path) -> set[str]:
    """imgpipe modules a Python file imports anywhere (top level or inside functions), by AST."""
    stat = Path(path).stat()
    return set(_imported_modules(str(path), stat.st_mtime_ns, stat.st_size))


# Every rule's fingerprint walks the same modules: parse each file once per
# version of it (keyed by mtime and size), not once per rule.
@functools.cache
def _imported_modules(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    here = _module_of(Path(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, here, Path(path).name == "__init__.py")
            if module is None:
                continue
            targets = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] == "imgpipe" and len(parts) >= 2:
                name = ".".join(parts[1:])
                if module_file(name) is not None:
                    found |= {n for n in _with_packages(name) if module_file(n) is not None}
    return frozenset(found)


def _absolute(node: ast.ImportFrom, here: str | None, is_package: bool) -> str | None:
    """The absolute module of a ``from X import`` (relative imports resolved inside imgpipe)."""
    if node.level == 0:
        return node.module
    if here is None:
        return None
    parts = ["imgpipe", *here.split(".")]
    if not is_package:
        parts = parts[:-1]
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def import_closure(path: str | Path) -> list[str]:
    """Every imgpipe module ``path`` runs: its imports, their imports, and so on (sorted)."""
    seen: set[str] = set()
    todo = sorted(imported_modules(path))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = module_file(name)
        if source is not None:
            todo.extend(imported_modules(source) - seen)
    return sorted(seen)


def code_fingerprint(script: str | Path) -> str:
    """Hash of a rule's script and the source of every imgpipe module it imports, transitively."""
    digest = hashlib.sha256()
    digest.update(Path(script).read_bytes())
    digest.update(b"__init__")
    digest.update((PACKAGE_DIR / "__init__.py").read_bytes())
    for name in import_closure(script):
        source = module_file(name)
        if source is None:
            continue
        digest.update(name.encode())
        digest.update(source.read_bytes())
        if source.name == "__init__.py":
            for data in package_data(source.parent):
                digest.update(str(data.relative_to(PACKAGE_DIR)).encode())
                digest.update(data.read_bytes())
    return digest.hexdigest()[:16]


def package_data(folder: Path) -> list[Path]:
    """A package's files that are not Python (e.g. imgpipe/report/templates/): code all the same."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    )
