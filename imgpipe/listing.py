"""List a data root (image-folder tree or CSV manifest) into the files.csv table.

Every file seen gets a row; files that cannot be used are kept as
``status=rejected`` with a ``reason`` and a human ``detail`` instead of being
skipped silently. Whether what remains is enough (empty, a single class) is
the clean stage's decision, not the listing's.
"""

from __future__ import annotations

import errno
import logging
import os
import unicodedata
from collections.abc import Iterable, Iterator

import pandas as pd

from imgpipe.atomic import write_csv
from imgpipe.errors import DataError
from imgpipe.stage import StageJob

log = logging.getLogger("imgpipe")

COLUMNS = ["path", "relpath", "label", "source", "status", "reason", "detail"]
HIDDEN_FOLDERS = frozenset({"__MACOSX"})

Row = tuple[str, str, str, str, str, str, str]


def normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    """Lower-case extensions with their leading dot (``PNG`` -> ``.png``)."""
    return frozenset("." + e.lower().lstrip(".") for e in extensions)


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (dot file) or macOS archive debris."""
    return name.startswith(".") or name in HIDDEN_FOLDERS


def _printable(path: str) -> str:
    """A path that can be written as UTF-8 even when the file system name is not."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name (surrogate escapes)
        return False
    return True


def _link_problem(path: str) -> tuple[str, str] | None:
    """(reason, detail) when a symlink cannot be followed, else None."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return "broken_symlink", f"link target {os.readlink(path)!r} does not exist"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink_loop", "symbolic links point at each other"
        return "unreadable", f"{type(err).__name__}: {err.strerror}"
    return None


class _TreeLister:
    """Walks ``<root>/<class>/<any depth>/<image>`` with os.scandir, yielding rows."""

    def __init__(self, root: str, extensions: frozenset[str], source: str) -> None:
        self.root = os.path.abspath(root)
        self.extensions = extensions
        self.source = source

    def row(self, path: str, rel: str, label: str, reason: str = "", detail: str = "") -> Row:
        status = "rejected" if reason else "ok"
        return (_printable(path), _printable(rel), label, self.source, status, reason, detail)

    def rows(self) -> Iterator[Row]:
        # Explicit stack (no recursion limit on deep trees). Each entry carries
        # the real paths of its ancestors so a symlink back up is a loop.
        stack = [(self.root, "", "", (os.path.realpath(self.root),))]
        while stack:
            folder, rel, label, ancestors = stack.pop()
            try:
                entries = os.scandir(folder)
            except OSError as err:
                if not rel:
                    raise DataError(f"data root {self.root!r} cannot be read: {err}") from err
                yield self.row(folder, rel, label, "unreadable", f"folder: {err.strerror}")
                continue
            with entries:
                for entry in entries:
                    yield from self.visit(entry, rel, label, ancestors, stack)

    def visit(
        self, entry: os.DirEntry, rel: str, label: str, ancestors: tuple, stack: list
    ) -> Iterator[Row]:
        """Rows for one directory entry; folders to descend are pushed onto ``stack``."""
        name = entry.name
        child_rel = f"{rel}/{name}" if rel else name
        child_label = label or unicodedata.normalize("NFC", name)
        if is_hidden(name):
            kind = "folder, not listed" if entry.is_dir(follow_symlinks=False) else "file"
            yield self.row(entry.path, child_rel, label, "hidden", f"hidden {kind}")
            return
        if not _valid_name(name):
            yield self.row(entry.path, child_rel, label, "unreadable", "name is not valid UTF-8")
            return
        if entry.is_symlink():
            problem = _link_problem(entry.path)
            if problem:
                yield self.row(entry.path, child_rel, label, *problem)
                return
        if entry.is_dir():
            real = os.path.realpath(entry.path) if entry.is_symlink() else None
            if real is not None and real in ancestors:
                yield self.row(
                    entry.path,
                    child_rel,
                    label,
                    "symlink_loop",
                    "links back to an enclosing folder",
                )
                return
            real = real or os.path.realpath(entry.path)
            stack.append((entry.path, child_rel, child_label, (*ancestors, real)))
            return
        yield self.file_row(entry, child_rel, label)

    def file_row(self, entry: os.DirEntry, rel: str, label: str) -> Row:
        """The row of a non-folder entry inside the tree."""
        ext = os.path.splitext(entry.name)[1].lower()
        if ext not in self.extensions:
            return self.row(
                entry.path, rel, label, "unsupported_extension", f"extension {ext or '(none)'!r}"
            )
        if not label:
            return self.row(
                entry.path,
                rel,
                label,
                "no_class",
                "image directly in the root, outside any class folder",
            )
        if not entry.is_file():
            return self.row(entry.path, rel, label, "unreadable", "not a regular file")
        if not os.access(entry.path, os.R_OK):
            return self.row(entry.path, rel, label, "unreadable", "no read permission")
        return self.row(entry.path, rel, label)


def scan_tree(
    root: str | os.PathLike, extensions: Iterable[str], source: str = "train"
) -> list[Row]:
    """Rows of every entry of an ImageFolder tree ``<root>/<class>/<any depth>/<image>``."""
    return list(_TreeLister(os.fspath(root), normalise_extensions(extensions), source).rows())


def _manifest_file_problem(path: str) -> tuple[str, str] | None:
    if not os.path.lexists(path):
        return "missing_file", "listed in the manifest but not on disk"
    if os.path.islink(path):
        problem = _link_problem(path)
        if problem:
            return problem
    if not os.path.isfile(path):
        return "unreadable", "not a regular file"
    if not os.access(path, os.R_OK):
        return "unreadable", "no read permission"
    return None


def read_manifest(
    manifest: str | os.PathLike, extensions: Iterable[str], source: str = "train"
) -> list[Row]:
    """Rows of a CSV manifest with columns ``path,label`` (paths relative to its folder)."""
    manifest = os.path.abspath(manifest)
    try:
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"manifest {manifest!r} cannot be read as CSV: {err}") from err
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(
            f"manifest {manifest!r} lacks column(s) {sorted(missing)} (needs path,label)"
        )
    base = os.path.dirname(manifest)
    exts = normalise_extensions(extensions)
    first_line: dict[str, int] = {}
    rows = []
    # Line numbers as a user sees them in an editor (line 1 is the header).
    for line, (given, label) in enumerate(zip(table["path"], table["label"], strict=True), start=2):
        given = given.strip()
        label = unicodedata.normalize("NFC", label.strip())
        full = os.path.normpath(os.path.join(base, given))
        rel = os.path.relpath(full, base).replace(os.sep, "/")
        if not given or rel == ".." or rel.startswith("../"):
            rows.append(
                (
                    full,
                    given,
                    label,
                    source,
                    "rejected",
                    "outside_root",
                    f"line {line}: not inside {base!r}",
                )
            )
            continue
        if rel in first_line:
            detail = f"line {line}: same file as line {first_line[rel]}"
            rows.append((full, rel, label, source, "rejected", "duplicate_row", detail))
            continue
        first_line[rel] = line
        ext = os.path.splitext(full)[1].lower()
        if ext not in exts:
            problem = ("unsupported_extension", f"extension {ext or '(none)'!r}")
        elif not label:
            problem = ("no_class", "empty label")
        else:
            problem = _manifest_file_problem(full)
        reason, detail = problem or ("", "")
        status = "rejected" if reason else "ok"
        rows.append(
            (full, rel, label, source, status, reason, f"line {line}: {detail}" if detail else "")
        )
    return rows


def list_source(
    root: str | os.PathLike, extensions: Iterable[str], source: str = "train"
) -> list[Row]:
    """Rows of one data root: a manifest when ``root`` is a file, else an image tree."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DataError(
            f"data root {root!r} does not exist (give an image folder <root>/<class>/... "
            "or a CSV manifest with path,label)"
        )
    if os.path.isfile(root):
        return read_manifest(root, extensions, source)
    return scan_tree(root, extensions, source)


def list_images(
    root: str | os.PathLike,
    extensions: Iterable[str],
    test_root: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """The files.csv table of ``root`` (source ``train``) and ``test_root`` (source ``test``)."""
    extensions = list(extensions)
    rows = list_source(root, extensions, "train")
    if test_root:
        rows += list_source(test_root, extensions, "test")
    table = pd.DataFrame(rows, columns=COLUMNS, dtype=str)
    return table.sort_values(["source", "relpath"], kind="stable", ignore_index=True)


def load_files(path: str | os.PathLike) -> pd.DataFrame:
    """Read files.csv back with every column as text (empty cells stay empty strings)."""
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def run_list_images(job: StageJob) -> pd.DataFrame:
    """The list_images stage: one row per file under data.root (and data.test_root) in files.csv."""
    files = list_images(job.params["root"], job.params["extensions"], job.params["test_root"])
    write_csv(files, job.output["listing"])
    counts = files.groupby(["source", "status"]).size().to_dict()
    log.info("listed %d files: %s", len(files), counts)
    for reason, count in files.loc[files["status"] == "rejected", "reason"].value_counts().items():
        log.info("listing rejected %d file(s) as %s", count, reason)
    return files
