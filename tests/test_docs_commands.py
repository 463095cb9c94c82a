"""Every command the README and docs/ show names something that exists: `mistral-lightning` subcommands,
`make` targets, `python -P -m` modules and the configs they pass; and every whole `mistral-lightning`
command line in a code block parses with its command's own parser (fit/validate/test/predict/plan lines
load their configs and check every override against the classes they name).

The snippets are not run here: most need the 7B weights, the recipe's data or 8 devices. What the tiny
config can run is run by the tests of each command (tests/README.md says which file covers what); the
lines that are not whole commands are in NOT_COMMAND_LINES with the reason.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from mistral_lightning.cli import SUBCOMMANDS
from mistral_lightning.cli.plan import calibrate_parser, parse_config

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


# Lines that show a command without being one, each with why it cannot be parsed as it stands.
NOT_COMMAND_LINES = {
    "mistral-lightning evaluate --checkpoint BASE_HF_DIR --adapter adapter ...": "elides the mode's options",
    "mistral-lightning fit --config configs/tiny/finetune.yaml)": "a heading the demo prints",
    "mistral-lightning evaluate)": "a heading the demo prints",
}
LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict", "plan"}


def command_lines() -> list[tuple[str, str]]:
    """(page, command line) for every `mistral-lightning` line of the pages' fenced blocks, continuation
    lines joined, `# comments` dropped and `[--optional groups]` opened."""
    lines = set()
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                found = re.search(r"\bmistral-lightning [a-z].*", line)
                if found:
                    command = found.group(0).split(" # ")[0]
                    lines.add((page.relative_to(REPO).as_posix(), " ".join(command.split())))
    return sorted(lines)


@pytest.mark.parametrize("page, line", command_lines())
def test_each_documented_command_line_parses(page, line):
    if line in NOT_COMMAND_LINES:
        return
    # `[--option value]` is optional, `a|b` a choice: the line is checked with every option and the first choice.
    words = [word.strip("[]").split("|")[0] for word in shlex.split(line)]
    command, argv = words[1], [word for word in words[2:] if word]
    if command == "plan" and argv[:1] == ["calibrate"]:
        calibrate_parser().parse_args(argv[1:])
        return
    if command in LIGHTNING_COMMANDS:
        parse_config(argv)  # jsonargparse exits (SystemExit) on an unknown key or a value of the wrong type
        return
    module = importlib.import_module(SUBCOMMANDS[command][0])
    module.build_parser().parse_args(argv)


def test_the_command_lines_are_found_and_the_exceptions_are_among_them():
    found = {line for _, line in command_lines()}
    assert len(found) > 25
    assert set(NOT_COMMAND_LINES) <= found, "an exception no longer shown in the docs: remove it"
