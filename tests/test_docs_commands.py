"""Every command the README and docs/ show names something that exists: `mistral-lightning` subcommands,
`make` targets, `python -P -m` modules and the configs they pass.

The snippets themselves are not run here: most need the 7B weights, the recipe's data or 8 devices. What
the tiny config can run is run by the tests of each command (tests/README.md says which file covers what).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from mistral_lightning.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", REPO / "benchmarks" / "README.md", REPO / "tests" / "README.md"]
PAGES += sorted((REPO / "docs").glob("*.md"))
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)


def code(page: Path) -> str:
    """The page's fenced blocks and inline code spans."""
    text = page.read_text()
    return "\n".join(FENCE.findall(text) + re.findall(r"`([^`\n]+)`", FENCE.sub("", text)))


def named(pattern: str) -> list[tuple[str, str]]:
    """(page, name) for every match of `pattern`'s group in the pages' code."""
    return sorted(
        {
            (page.relative_to(REPO).as_posix(), name)
            for page in PAGES
            for name in re.findall(pattern, code(page))
        }
    )


@pytest.mark.parametrize("page, command", named(r"\bmistral-lightning ([a-z][a-z-]*)"))
def test_each_documented_subcommand_exists(page, command):
    assert command in SUBCOMMANDS, f"{page}: `mistral-lightning {command}` is not a command"


@pytest.mark.parametrize("page, target", named(r"\bmake ([a-z][a-z-]*)"))
def test_each_documented_make_target_exists(page, target):
    assert re.search(rf"^{re.escape(target)}:", (REPO / "Makefile").read_text(), re.M), (
        f"{page}: make {target}"
    )


@pytest.mark.parametrize("page, module", named(r"\bpython -P -m ([a-z_][a-z0-9_.]*[a-z0-9_])"))
def test_each_documented_module_imports(page, module):
    assert importlib.util.find_spec(module) is not None, f"{page}: python -P -m {module}"


@pytest.mark.parametrize("page, config", named(r"\b(configs/[A-Za-z0-9_./-]+\.yaml)"))
def test_each_documented_config_exists(page, config):
    assert (REPO / config).is_file(), f"{page}: {config}"


def test_the_pages_show_commands_of_every_kind():
    """The patterns above find what they look for (a pattern that matched nothing would pass vacuously)."""
    assert len(named(r"\bmistral-lightning ([a-z][a-z-]*)")) > 20
    assert {"test", "demo", "test-fast", "test-latest"} <= {
        target for _, target in named(r"\bmake ([a-z][a-z-]*)")
    }
    assert len(named(r"\bpython -P -m ([a-z_][a-z0-9_.]*[a-z0-9_])")) > 5
    assert len(named(r"\b(configs/[A-Za-z0-9_./-]+\.yaml)")) > 5
