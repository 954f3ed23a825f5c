"""Every CLI command and every operator is documented in the README and exercised by a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from skillhub.cli import main
from skillhub.operators import catalog, operator_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_is_documented(command: str) -> None:
    assert f"`skillhub {command}" in README


@pytest.mark.parametrize("operator", operator_names())
def test_every_operator_is_documented_and_tested(operator: str) -> None:
    assert f"| `{operator}` |" in README
    source = catalog().usable[operator]
    if source.builtin:
        assert f'"{operator}"' in (ROOT / "tests" / "test_operators.py").read_text()
    else:  # one of ours under plugins/: its own README and its own tests
        plugin = ROOT / "plugins" / source.distribution
        assert f"`{operator}`" in (plugin / "README.md").read_text()
        assert any(plugin.glob("tests/test_*.py"))


def test_readme_shows_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README
