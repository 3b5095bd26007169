"""git habits (issue 19): ``tag NAME [REF]``, ``log`` decorations, ``branch -d/-D/-m``, ``-h``
and did-you-mean for refs. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlreg.cli.main import cli
from tlreg.registry import Registry


@pytest.fixture
def base(tlreg: Callable, weights_file: Path) -> str:
    """An initialised home with an imported root branch ``base``; its head's id."""
    assert tlreg("init").exit_code == 0
    assert tlreg("import", str(weights_file), "--name", "base").exit_code == 0
    return tlreg("show", "base").output.split()[1]


def _error(result: object, *needles: str) -> str:
    out = result.output  # type: ignore[attr-defined]
    assert result.exit_code != 0, out  # type: ignore[attr-defined]
    line = out.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, out
    return line


def test_tag_takes_name_then_ref_as_git_does(tlreg: Callable, base: str) -> None:
    result = tlreg("tag", "v1", "base")
    assert result.exit_code == 0, result.output
    assert tlreg("tag").output.split() == ["v1", base[:12]]


def test_the_old_tag_order_is_refused_with_the_swapped_command(
    tlreg: Callable, base: str, registry_url: str
) -> None:
    _error(tlreg("tag", "base", "v1"), "tag takes NAME then REF", "'tlreg tag v1 base'")
    registry = Registry(registry_url)
    assert registry.tags() == []
    registry.close()


def test_tag_without_a_ref_says_what_to_add(tlreg: Callable, base: str) -> None:
    _error(tlreg("tag", "v1"), "tlreg tag v1 BRANCH")


def test_log_decorates_heads_and_tags(tlreg: Callable, base: str) -> None:
    assert tlreg("branch", "child", "base").exit_code == 0
    assert tlreg("tag", "v1", "base").exit_code == 0
    (line,) = tlreg("log", "base").output.splitlines()
    assert line.startswith(base[:12])
    assert "(head: base, head: child, tag: v1)" in line


def test_branch_d_refuses_a_branch_others_were_made_from(
    tlreg: Callable, base: str, registry_url: str
) -> None:
    assert tlreg("branch", "child", "base").exit_code == 0
    _error(tlreg("branch", "-d", "base"), "1 branches made from it (child)", "tlreg branch -D base")
    registry = Registry(registry_url)
    assert [b.name for b in registry.branches()] == ["base", "child"]
    registry.close()
    assert tlreg("branch", "-D", "base").exit_code == 0
    assert tlreg("branch", "-d", "child").exit_code == 0
    assert tlreg("branches").output.startswith("no branches")


def test_branch_m_renames_and_keeps_history(tlreg: Callable, base: str) -> None:
    assert tlreg("tag", "v1", "base").exit_code == 0
    result = tlreg("branch", "-m", "base", "digits")
    assert result.exit_code == 0, result.output
    assert result.output == "renamed branch base to digits\n"
    (line,) = tlreg("log", "digits").output.splitlines()
    assert line.startswith(f"{base[:12]}  digits@0") and "(head: digits, tag: v1)" in line
    _error(tlreg("log", "base"), "branch 'base' does not exist")
    assert tlreg("branch", "x").exit_code == 0
    _error(tlreg("branch", "-m", "digits", "x"), "already exists")


def test_branch_without_a_name_lists_branches(tlreg: Callable, base: str) -> None:
    result = tlreg("branch")
    assert result.exit_code == 0
    assert result.output == tlreg("branches").output


@pytest.mark.parametrize(
    "command", [(), *[(name,) for name in sorted(cli.commands)]], ids=lambda c: "-".join(c)
)
def test_dash_h_is_help_everywhere(tlreg: Callable, command: tuple[str, ...]) -> None:
    short = tlreg(*command, "-h")
    assert short.exit_code == 0, short.output
    assert short.output == tlreg(*command, "--help").output
    assert short.output.startswith("Usage: ")


def test_a_misspelled_ref_suggests_the_close_names(tlreg: Callable, base: str) -> None:
    assert tlreg("tag", "release-1", "base").exit_code == 0
    _error(tlreg("log", "bsae"), "(did you mean 'base'?)")
    _error(tlreg("show", "relase-1"), "(did you mean 'release-1'?)")
    line = _error(tlreg("show", "zzzzzz"))
    assert "did you mean" not in line


def test_an_empty_branch_says_to_train_it(tlreg: Callable, base: str) -> None:
    assert tlreg("branch", "empty").exit_code == 0
    _error(tlreg("show", "empty"), "has no checkpoint yet: train it ('tlreg train empty')")


def _complete(home: Path, registry_url: str, *words: str) -> list[str]:
    """What ``tlreg WORDS<TAB>`` completes to in bash (click's completion protocol)."""
    env = {
        "_TLREG_COMPLETE": "bash_complete",
        "COMP_WORDS": " ".join(["tlreg", *words]),
        "COMP_CWORD": str(len(words)),
        "TLREG_HOME": str(home),
        "TLREG_REGISTRY_URL": registry_url,
    }
    result = CliRunner().invoke(cli, [], prog_name="tlreg", env=env)
    assert result.exit_code == 0, result.output
    return [line.split(",", 1)[1] for line in result.output.splitlines() if line]


def test_branch_and_tag_names_complete_in_the_shell(
    tlreg: Callable, base: str, home: Path, registry_url: str
) -> None:
    assert tlreg("branch", "base-two", "base").exit_code == 0
    assert tlreg("tag", "v1", "base").exit_code == 0
    assert _complete(home, registry_url, "log", "ba") == ["base", "base-two"]
    assert _complete(home, registry_url, "show", "v") == ["v1"]  # refs: tags too
    assert _complete(home, registry_url, "log", "v") == []  # log takes a branch
    assert _complete(home, registry_url, "branch", "new", "v") == ["v1"]  # FROM is a ref


def test_completion_creates_no_registry(tmp_path: Path) -> None:
    home = tmp_path / "nowhere"
    assert _complete(home, f"sqlite:///{home / 'registry.db'}", "log", "") == []
    assert not home.exists()


def test_the_command_list_is_not_cut_off(tlreg: Callable) -> None:
    out = tlreg("-h").output
    commands = out.split("Commands:\n", 1)[1]
    assert not [line for line in commands.splitlines() if line.endswith("...")]
    assert "branches made" not in commands  # (first sentences only)
    assert "Tag checkpoint REF as NAME (git's order); with no arguments, list\n" in commands


def test_help_examples_keep_their_lines(tlreg: Callable) -> None:
    assert "\n  Example:\n    tlreg show base --tensors\n" in tlreg("show", "-h").output
    assert "\n    tlreg init --store s3://bucket/prefix\n" in tlreg("init", "-h").output
