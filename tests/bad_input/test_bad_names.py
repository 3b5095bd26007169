"""Branch, tag and ref names: accepted and round-tripped exactly, or refused in one line.

A refused name exits non-zero with one ``Error:`` line that names the problem, and nothing
stored changes (every store file and registry row is compared before and after).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from faultlib import COUNTS, trials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlreg.registry import InvalidName, validate_name

NASTY = [
    "",
    ".",
    "..",
    "/",
    "a/../b",
    "a//b",
    "/abs",
    "trailing/",
    "-rf",
    "x" * 10_000,
    "bell\x07",
    "nul\x00byte",
    "esc\x1b[31mred",
    "new\nline",
    "tab\tname",
    "m\u0430in",  # Cyrillic a inside Latin
    "\uff4d\uff41\uff49\uff4e",  # fullwidth "main"
    "main\u200b",  # zero-width space
    "\u202eniam",  # right-to-left override
    "re\u0301sume",  # decomposed accent (not NFC)
    "\ufb01le",  # ligature
    "a\u00a0b",  # no-break space
    "name.lock",
    "@",
    "a@{1}",
    "ends.",
    ".hidden",
    "a:b",
    "a?b",
    "a*b",
    "a[b",
    "a\\b",
    "a~1",
    "a^2",
]


def _refused(result: object, *needles: str) -> None:
    out = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 1, out  # type: ignore[attr-defined]
    assert out.startswith("Error: ") and out.count("\n") == 1, out
    assert len(out) < 600, f"error line of {len(out)} characters"
    for needle in needles:
        assert needle in out, out


@pytest.fixture
def base(tlreg: Callable, weights_file: Path) -> str:
    tlreg("init")
    return json.loads(tlreg("import", str(weights_file), "--name", "base", "--json").output)["id"]


@pytest.mark.parametrize("name", NASTY, ids=[repr(n)[:24] for n in NASTY])
def test_nasty_names_are_refused_for_branches_and_tags_and_change_nothing(
    tlreg: Callable, base: str, snapshot: Callable, name: str
) -> None:
    before = snapshot()
    _refused(tlreg("branch", "--", name, "base"), "branch name")
    _refused(tlreg("tag", "--", name, "base"), "tag name")
    assert snapshot() == before
    COUNTS["bad input: nasty names refused (branch and tag)"] += 2


@pytest.mark.parametrize("name", NASTY, ids=[repr(n)[:24] for n in NASTY])
def test_nasty_refs_are_not_found_in_one_short_line(
    tlreg: Callable, base: str, snapshot: Callable, name: str
) -> None:
    before = snapshot()
    for command in ("show", "log", "lineage", "verify"):
        _refused(tlreg(command, "--", name))
    assert snapshot() == before


def _accepted_or_refused(tlreg: Callable, snapshot: Callable, base: str, name: str) -> None:
    before = snapshot()
    try:
        validate_name(name)
    except InvalidName:
        _refused(tlreg("branch", "--", name, "base"), "invalid branch name")
        _refused(tlreg("tag", "--", name, "base"), "invalid tag name")
        assert snapshot() == before
        COUNTS["bad input: generated names refused"] += 1
        return
    made = tlreg("branch", "--", name, "base")
    assert made.exit_code == 0, made.output
    assert json.loads(tlreg("show", "--json", "--", name).output)["id"] == base
    assert name in [b["name"] for b in json.loads(tlreg("branches", "--json").output)]
    assert tlreg("branch", "-d", "--", name).exit_code == 0
    assert snapshot() == before
    COUNTS["bad input: generated names accepted and round-tripped"] += 1


@settings(
    max_examples=trials(short=60, long=1000),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=0, max_size=40)
    | st.sampled_from(["main", "team/digits", "résumé", "モデル-v2", "v1.0", "a@b", "x_y"])
)
@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_any_name_is_accepted_and_round_trips_or_is_refused_changing_nothing(
    tlreg: Callable, base: str, snapshot: Callable, name: str
) -> None:
    _accepted_or_refused(tlreg, snapshot, base, name)
