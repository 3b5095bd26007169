"""Branch and tag names follow git's check-ref-format rules."""

from __future__ import annotations

import pytest

from tlreg.registry import InvalidName, Registry, validate_name
from tlreg.registry.names import shown

INVALID = {
    "empty": "",
    "double dot": "a..b",
    "control character": "a\x01b",
    "newline": "a\nb",
    "delete character": "a\x7fb",
    "space": "a b",
    "tilde": "a~1",
    "caret": "a^b",
    "colon": "a:b",
    "question mark": "a?",
    "asterisk": "a*",
    "open bracket": "a[0]",
    "backslash": "a\\b",
    "leading dash": "-a",
    "leading slash": "/a",
    "trailing slash": "a/",
    "double slash": "a//b",
    "trailing dot": "a.",
    "lock suffix": "a.lock",
    "lock suffix in a component": "a.lock/b",
    "component starting with dot": "a/.b",
    "leading dot": ".a",
    "at brace": "a@{1}",
    "lone at": "@",
    "too long": "a" * 256,
}

VALID = ["main", "digits-head", "team/digits", "v1.0", "a@b", "x_y", "A" * 255, "résumé", "a.b/c"]


@pytest.mark.parametrize("name", list(INVALID.values()), ids=list(INVALID))
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name, "tag")
    message = str(info.value)
    assert message.startswith(f"invalid tag name {shown(name)}: ") and len(message) < 400
    assert "\n" not in message


@pytest.mark.parametrize("name", VALID)
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["a..b", "a b", "-x", "a.lock", "@"])
def test_registry_refuses_invalid_branch_and_tag_names(registry: Registry, name: str) -> None:
    with pytest.raises(InvalidName, match="invalid branch name"):
        registry.create_branch(name)
    registry.create_branch("main")
    registry.commit("main", "aaaa0001", step=0, objects={})
    with pytest.raises(InvalidName, match="invalid tag name"):
        registry.tag("main", name)
    assert [b.name for b in registry.branches()] == ["main"]
    assert registry.tags() == []
