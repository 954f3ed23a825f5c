"""The documentation cannot rot: the site builds with --strict, every command and operator has its
place in it, and every flag a command example uses is one the command has."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from skillhub.cli import main
from skillhub.operators import catalog, operator_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = {path: path.read_text() for path in sorted((ROOT / "docs").rglob("*.md"))}
DOCS = "\n".join(PAGES.values())


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs --strict: a broken link, anchor or API reference, or a page left out of the nav, fails."""
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": ""})
    assert build.returncode == 0, build.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--calib" in cli and "--dry-run" in cli  # the generated command reference is really there
    python = (tmp_path / "site" / "reference" / "python" / "index.html").read_text()
    assert "create_pack" in python and "Raises" in python


def test_the_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) <= 250
    assert "make demo" in README and "make test" in README
    for link in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_is_documented(command: str) -> None:
    assert f"`skillhub {command}" in DOCS


@pytest.mark.parametrize("operator", operator_names())
def test_every_operator_is_documented_and_tested(operator: str) -> None:
    assert f"| `{operator}` |" in DOCS
    source = catalog().usable[operator]
    if source.builtin:
        assert f'"{operator}"' in (ROOT / "tests" / "test_operators.py").read_text()
    else:  # one of ours under plugins/: its own README and its own tests
        plugin = ROOT / "plugins" / source.distribution
        assert f"`{operator}`" in (plugin / "README.md").read_text()
        assert any(plugin.glob("tests/test_*.py"))


def _examples(text: str) -> list[str]:
    """Every ``skillhub ...`` command line in a text: in code blocks (continuations joined, comments
    dropped) and in inline code."""
    found = []
    for block in re.findall(r"```(?:bash|console|shell|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip().removeprefix("$ ")
            found.extend(part.strip() for part in re.split(r"&&|\|\||;|\|", line)
                         if part.strip().startswith("skillhub "))
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found.extend(re.findall(r"`(skillhub [^`]+)`", prose))
    return found


def _flags_of(line: str) -> tuple[str, list[str], set[str]]:
    """(the command's path, the flags the line uses, the flags the command has)."""
    words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " ").replace("(", " ").replace(")", " "),
                        posix=True)[1:]
    command: click.Command = main
    path = ["skillhub"]
    known = {opt for param in main.params for opt in param.opts + param.secondary_opts} | {"--help", "-h"}
    for word in words:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
            path.append(word)
            known |= {opt for param in command.params for opt in param.opts + param.secondary_opts}
        elif not word.startswith("-"):
            break
    used = [word.split("=")[0] for word in words if re.fullmatch(r"--?[a-zA-Z][\w-]*(=.*)?", word)]
    return " ".join(path), used, known


def test_every_documented_flag_exists() -> None:
    """The flags of every command example in the docs and the README are ones the command takes:
    a renamed or removed option fails here, not in a reader's terminal."""
    unknown = []
    examples = 0
    for where, text in [*((p.relative_to(ROOT), t) for p, t in PAGES.items()), (Path("README.md"), README)]:
        for line in _examples(text):
            examples += 1
            command, used, known = _flags_of(line)
            unknown.extend(f"{where}: {command} {flag}" for flag in used if flag not in known)
    assert examples > 100  # the parser does find the examples
    assert not unknown, "\n".join(unknown)


def test_the_flag_check_catches_a_missing_flag() -> None:
    command, used, known = _flags_of("skillhub create base tuned out --calib c.txt --no-such-flag")
    assert command == "skillhub create" and "--calib" in known and "--no-such-flag" not in known
    assert used == ["--calib", "--no-such-flag"]
    command, used, known = _flags_of("skillhub route train --threshold 0.5")
    assert command == "skillhub route train" and "--threshold" in known
