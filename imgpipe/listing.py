"""List a data root (image-folder tree or CSV manifest) into the files.csv table.

Every file seen gets a row; files that cannot be used are kept as
``status=rejected`` with a ``reason`` and a human ``detail`` instead of being
skipped silently. Whether what remains is enough (empty, a single class) is
the clean stage's decision, not the listing's.

Inputs stay inside what the user named: every listed file is resolved, and a
symlink (file or folder, in a tree or a manifest row) whose target lies outside
the resolved root is refused as ``outside_root`` unless ``follow_symlinks``.

File names are bytes on POSIX. A name that is not valid UTF-8 is kept as
Python decodes it (``os.fsdecode``: surrogateescape), so ``path`` and
``relpath`` give back the very bytes with ``os.fsencode``; the CSVs keep them
byte for byte (``imgpipe.atomic.write_csv`` / ``read_csv``). Labels and human
text show such bytes as ``\\xNN`` (:func:`printable`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import unicodedata
from collections.abc import Iterable, Iterator
from typing import Any

import pandas as pd

from imgpipe.atomic import read_csv, write_csv
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


def printable(text: str) -> str:
    """``text`` as valid UTF-8 for people: the raw bytes of a non-UTF-8 file name shown as ``\\xNN``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no byte decoded to
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _label(name: str) -> str:
    """A class name from a folder name or a manifest cell: NFC, byte names shown as ``\\xNN``."""
    return printable(unicodedata.normalize("NFC", name))


def _inside(real: str, real_root: str) -> bool:
    """Whether the resolved path ``real`` is ``real_root`` or lies below it."""
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def _outside_detail(real: str, real_root: str) -> str:
    return (
        f"symlink target {printable(real)!r} is outside {printable(real_root)!r} "
        "(follow_symlinks is off)"
    )


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

    def __init__(
        self, root: str, extensions: frozenset[str], source: str, follow_symlinks: bool = False
    ) -> None:
        self.root = os.path.abspath(root)
        self.real_root = os.path.realpath(self.root)
        self.extensions = extensions
        self.source = source
        self.follow_symlinks = follow_symlinks

    def row(self, path: str, rel: str, label: str, reason: str = "", detail: str = "") -> Row:
        status = "rejected" if reason else "ok"
        return (path, rel, label, self.source, status, reason, detail)

    def rows(self) -> Iterator[Row]:
        # Explicit stack (no recursion limit on deep trees). Each entry carries
        # the real paths of its ancestors so a symlink back up is a loop.
        stack = [(self.root, "", "", (self.real_root,))]
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
        child_label = label or _label(name)
        if is_hidden(name):
            kind = "folder, not listed" if entry.is_dir(follow_symlinks=False) else "file"
            yield self.row(entry.path, child_rel, label, "hidden", f"hidden {kind}")
            return
        real = None
        if entry.is_symlink():
            problem = _link_problem(entry.path)
            if problem:
                yield self.row(entry.path, child_rel, label, *problem)
                return
            # Only links can lead out: a plain entry of a folder inside the root is inside.
            real = os.path.realpath(entry.path)
            if not self.follow_symlinks and not _inside(real, self.real_root):
                kind = "folder, not listed" if entry.is_dir() else "file"
                detail = f"{kind}: {_outside_detail(real, self.real_root)}"
                yield self.row(entry.path, child_rel, label, "outside_root", detail)
                return
        if entry.is_dir():
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
    root: str | os.PathLike,
    extensions: Iterable[str],
    source: str = "train",
    follow_symlinks: bool = False,
) -> list[Row]:
    """Rows of every entry of an ImageFolder tree ``<root>/<class>/<any depth>/<image>``."""
    lister = _TreeLister(os.fspath(root), normalise_extensions(extensions), source, follow_symlinks)
    return list(lister.rows())


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


class _Resolver:
    """Resolved paths of manifest rows, the real path of each folder computed once."""

    def __init__(self) -> None:
        self.folders: dict[str, str] = {}

    def real(self, path: str) -> str:
        """``os.path.realpath(path)`` for about one lstat per row (folders are cached)."""
        folder, name = os.path.split(path)
        if folder not in self.folders:
            self.folders[folder] = os.path.realpath(folder)
        joined = os.path.join(self.folders[folder], name)
        return os.path.realpath(joined) if os.path.islink(joined) else joined


def read_manifest(
    manifest: str | os.PathLike,
    extensions: Iterable[str],
    source: str = "train",
    follow_symlinks: bool = False,
) -> list[Row]:
    """Rows of a CSV manifest with columns ``path,label`` (paths relative to its folder)."""
    manifest = os.path.abspath(manifest)
    try:
        table = read_csv(manifest, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise DataError(f"manifest {manifest!r} cannot be read as CSV: {err}") from err
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DataError(
            f"manifest {manifest!r} lacks column(s) {sorted(missing)} (needs path,label)"
        )
    base = os.path.dirname(manifest)
    real_base = os.path.realpath(base)
    resolver = _Resolver()
    exts = normalise_extensions(extensions)
    first_line: dict[str, int] = {}
    rows = []
    # Line numbers as a user sees them in an editor (line 1 is the header).
    for line, (given, label) in enumerate(zip(table["path"], table["label"], strict=True), start=2):
        given = given.strip()
        label = _label(label.strip())
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
        real = resolver.real(full) if not follow_symlinks else real_base
        if not _inside(real, real_base) and os.path.exists(full):
            # A symlinked row or folder leads out (a broken link is reported below).
            detail = f"line {line}: {_outside_detail(real, real_base)}"
            rows.append((full, rel, label, source, "rejected", "outside_root", detail))
            continue
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
    root: str | os.PathLike,
    extensions: Iterable[str],
    source: str = "train",
    follow_symlinks: bool = False,
) -> list[Row]:
    """Rows of one data root: a manifest when ``root`` is a file, else an image tree."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DataError(
            f"data root {root!r} does not exist (give an image folder <root>/<class>/... "
            "or a CSV manifest with path,label)"
        )
    if os.path.isfile(root):
        return read_manifest(root, extensions, source, follow_symlinks)
    return scan_tree(root, extensions, source, follow_symlinks)


def list_images(
    root: str | os.PathLike,
    extensions: Iterable[str],
    test_root: str | os.PathLike | None = None,
    follow_symlinks: bool = False,
) -> pd.DataFrame:
    """The files.csv table of ``root`` (source ``train``) and ``test_root`` (source ``test``)."""
    extensions = list(extensions)
    rows = list_source(root, extensions, "train", follow_symlinks)
    if test_root:
        rows += list_source(test_root, extensions, "test", follow_symlinks)
    table = pd.DataFrame(rows, columns=COLUMNS, dtype=str)
    return table.sort_values(["source", "relpath"], kind="stable", ignore_index=True)


def load_files(path: str | os.PathLike) -> pd.DataFrame:
    """Read files.csv back with every column as text (empty cells stay empty strings)."""
    return read_csv(path, dtype=str, keep_default_na=False)


def run_list_images(job: StageJob) -> pd.DataFrame:
    """The list_images stage: one row per file under data.root (and data.test_root) in files.csv."""
    files = list_images(
        job.params["root"],
        job.params["extensions"],
        job.params["test_root"],
        follow_symlinks=bool(job.params["follow_symlinks"]),
    )
    write_csv(files, job.output["listing"])
    counts = files.groupby(["source", "status"]).size().to_dict()
    log.info("listed %d files: %s", len(files), counts)
    for reason, count in files.loc[files["status"] == "rejected", "reason"].value_counts().items():
        log.info("listing rejected %d file(s) as %s", count, reason)
    return files


def tree_fingerprint(root: str | os.PathLike, follow_symlinks: bool = False) -> str:
    """A hash of the names, sizes, modes and mtimes under ``root``: it changes when its files do.

    One ``os.scandir`` walk, one stat per file and no file is opened, so it is
    cheap enough to compute while Snakemake builds its DAG (the listing jobs
    take it as a param and rerun when it changes). Folders count by their
    names and contents, files by name, size, mode and mtime (a symlink by its
    target's, a broken one by its own). Hidden folders are not descended (the listing does not list them); symlinked folders only with
    ``follow_symlinks`` (else their targets inside the root are walked
    anyway). A manifest (a file) is fingerprinted by its own size and mtime.
    """
    digest = hashlib.blake2b(digest_size=16)
    root = os.fspath(root)
    stack = [(root, b"")]
    seen = {os.path.realpath(root)}
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as found:
                entries = sorted(found, key=lambda entry: entry.name)
        except NotADirectoryError:
            entries = None
        except OSError as err:  # the listing records it; its repair must rerun the listing
            digest.update(rel + f"\0error {err.errno}\n".encode())
            continue
        if entries is None:  # the root is a manifest file
            _digest_stat(digest, rel, os.stat(folder))
            continue
        for entry in entries:
            name = rel + b"/" + os.fsencode(entry.name)
            if not _is_folder(entry):
                try:
                    info = entry.stat()
                except OSError:  # a broken or looping symlink: its name is enough
                    info = entry.stat(follow_symlinks=False)
                _digest_stat(digest, name, info)
                continue
            # A folder by its name and contents, not its mtime (which changes with
            # every temporary file made and removed in it).
            digest.update(name + b"/\n")
            if is_hidden(entry.name):
                continue
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if not follow_symlinks or real in seen:
                    continue
                seen.add(real)
            stack.append((entry.path, name))
    return digest.hexdigest()


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder or a link to one (a looping link is not)."""
    try:
        return entry.is_dir()
    except OSError:  # ELOOP: is_dir only swallows FileNotFoundError
        return False


def _digest_stat(digest: Any, name: bytes, info: os.stat_result) -> None:
    """Feed one entry's name, size, mode and mtime to the fingerprint."""
    digest.update(b"%s\0%d %d %d\n" % (name, info.st_size, info.st_mode, info.st_mtime_ns))
