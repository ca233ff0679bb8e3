"""Every ``--config`` / ``--configfile`` command the README and docs/ show runs (``snakemake -n``).

The commands are read from the markdown (fenced ``bash`` blocks and inline
`snakemake ...` spans), so a new example is tested without touching this file.
Each runs as written, with ``-n`` put right after ``snakemake``, in one shared
copy of the workflow: data paths it names get a tiny image tree (absolute ones
are moved under the copy), and a config file it names is the YAML block the
same document introduces with that name, else a copy of the tiny test config.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers.workflow_utils import (
    REPO,
    SNAKEMAKE,
    TINY_CONFIG,
    copy_workflow,
    deep_merge,
    digits_tree,
    snakemake,
)
from snakemake.cli import parse_config

from imgpipe.workflow.config import load_schema

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SEPARATORS = {";", "|", "||", "&&", "&"}
# Keys of a config whose value is a data path the command needs to exist.
DATA_KEYS = (("data", "root"), ("data", "test_root"), ("predict", "input"))


def first_loop_values(block: str) -> dict[str, str]:
    """``for NAME in A B ...; do`` loops of a shell block: NAME -> its first value A."""
    return dict(re.findall(r"\bfor (\w+) in (\S+)", block))


def shell_commands(text: str) -> list[str]:
    """Every snakemake command of a markdown text, from ``snakemake`` to the end of its command."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        block = block.replace("\\\n", " ")
        loops = first_loop_values(block)
        for line in block.splitlines():
            start = re.search(r"(?<![\w/.-])snakemake\s", line)
            if start:
                command = line[start.start() :]
                for name, value in loops.items():
                    command = command.replace(f"${name}", value)
                found.append(command)
    found += re.findall(r"`(snakemake [^`]+)`", text)
    return found


def split_command(command: str) -> list[str]:
    """The command's words up to the first ``;``, ``|`` or ``&&``, without its comment."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    words = []
    for word in lexer:
        if word in SEPARATORS:
            break
        words.append(word)
    return words


def documented_commands() -> list[tuple[Path, list[str]]]:
    """(document, words) of every snakemake command that sets --config or --configfile."""
    commands = []
    for doc in DOCS:
        for command in shell_commands(doc.read_text(encoding="utf-8")):
            words = split_command(command)
            if any(w.startswith(("--config", "-C")) for w in words):
                commands.append((doc, words))
    return commands


def option_values(words: list[str], names: tuple[str, ...]) -> list[tuple[int, str]]:
    """(index, value) of every value given to the options ``names`` (``--opt a b`` or ``--opt=a``)."""
    found = []
    taking = False
    for i, word in enumerate(words):
        if word.startswith("-"):
            name, eq, value = word.partition("=")
            taking = name in names and not eq
            if name in names and eq:
                found.append((i, value))
        elif taking:
            found.append((i, word))
    return found


def documented_yaml(doc: Path, name: str) -> dict | None:
    """The YAML block ``doc`` introduces with `name` (in the paragraph just before it), if any."""
    text = doc.read_text(encoding="utf-8")
    for match in re.finditer(r"```yaml\n(.*?)```", text, re.S):
        before = text[: match.start()].rstrip().rsplit("\n\n", 1)[-1]
        if f"`{name}`" in before:
            return yaml.safe_load(match.group(1))
    return None


def local_path(path: str) -> str:
    """A data path as the test uses it: absolute ones move under the workflow copy."""
    return path.lstrip("/") if path.startswith("/") else path


def make_data(workdir: Path, config: dict) -> dict:
    """Give every data path ``config`` names a tiny tree in ``workdir``; return the config relocated."""
    for section, key in DATA_KEYS:
        path = (config.get(section) or {}).get(key)
        if isinstance(path, str) and path != "demo":
            config = deep_merge(config, {section: {key: local_path(path)}})
            if not (workdir / local_path(path)).exists():
                digits_tree(workdir / local_path(path), per_class=3, classes=2)
    return config


def prepare(workdir: Path, doc: Path, words: list[str]) -> list[str]:
    """Write the files and trees ``words`` needs into ``workdir``; return the words to run."""
    words = list(words)
    for i, value in option_values(words, ("--config", "-C")):
        given = parse_config([value])
        make_data(workdir, given)
        for section, key in DATA_KEYS:
            path = (given.get(section) or {}).get(key)
            if isinstance(path, str):
                words[i] = words[i].replace(path, local_path(path))
    for _, name in option_values(words, ("--configfile", "--configfiles")):
        if (workdir / name).exists():
            continue
        config = documented_yaml(doc, name) or deep_merge(TINY_CONFIG, {"data": {"root": "data"}})
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).write_text(yaml.safe_dump(make_data(workdir, config), sort_keys=False))
    return words


@pytest.fixture(scope="module")
def docs_workflow(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("docs"))
    shutil.copytree(REPO / ".test", workdir / ".test")
    digits_tree(workdir / "data", per_class=3, classes=2)
    return workdir


def test_the_docs_show_commands_with_config():
    commands = documented_commands()
    shown = {" ".join(words) for _, words in commands}
    assert any("--configfile" in c for c in shown) and any("--config " in c for c in shown)
    assert {doc.name for doc, _ in commands} >= {"README.md", "photos.md", "scaling.md"}


def test_no_target_follows_configfile_or_config():
    """--configfile / --config take several values: a target after them is read as one of them."""
    for doc, words in documented_commands():
        for _, value in option_values(words, ("--configfile", "--configfiles")):
            assert value.endswith((".yaml", ".yml", ".json")), (doc.name, words)
        for _, value in option_values(words, ("--config", "-C")):
            assert "=" in value, (doc.name, words)


@pytest.mark.slow
def test_every_documented_config_command_dry_runs(docs_workflow):
    failures = []
    for doc, words in documented_commands():
        args = prepare(docs_workflow, doc, words)
        proc = snakemake_as_written(docs_workflow, args)
        if proc.returncode != 0:
            text = (proc.stdout + proc.stderr)[-1500:]
            failures.append(f"{doc.name}: {shlex.join(words)}\n{text}")
    assert not failures, "\n\n".join(failures)


def snakemake_as_written(workdir: Path, words: list[str]) -> subprocess.CompletedProcess:
    """Run the documented words with -n right after snakemake (nothing after them is moved)."""
    assert words[0] == "snakemake", words
    return subprocess.run(
        ["timeout", "-k", "10", "300", SNAKEMAKE, "-n", *words[1:]],
        cwd=workdir,
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_the_largest_shard_count_builds_the_dag_quickly(docs_workflow):
    """ingest.shards at the schema's maximum: 100000 kept snakemake -n busy for 10 minutes."""
    schema = load_schema(REPO / "config" / "schema.yaml")
    maximum = schema["properties"]["ingest"]["properties"]["shards"]["maximum"]
    # Generous for a shared 2-core machine (about 16 s there, 6 s at 2 shards).
    snakemake(
        docs_workflow,
        "-n",
        "--quiet",
        "--configfile=.test/config/config.yaml",
        "--config",
        f"ingest={{'shards': {maximum}}}",
        timeout=180,
    )
