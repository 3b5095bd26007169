"""Branch and tag names: git's ``check-ref-format`` rules, so every name is also a valid git ref
component path and survives shells, URLs and file names."""

from __future__ import annotations

from tlreg.registry.errors import InvalidName

MAX_NAME_LENGTH = 255
_FORBIDDEN_CHARS = frozenset(" ~^:?*[\\")


def _problem(name: str) -> str | None:
    """Why ``name`` is refused, or None when it is valid."""
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is longer than {MAX_NAME_LENGTH} characters"
    if name == "@":
        return "'@' alone is reserved"
    for ch in name:
        if ord(ch) < 0x20 or ord(ch) == 0x7F:
            return "it contains an ASCII control character"
        if ch in _FORBIDDEN_CHARS:
            return f"it contains {ch!r}"
    if name.startswith("-"):
        return "it starts with '-'"
    if name.startswith("/") or name.endswith("/"):
        return "it starts or ends with '/'"
    if "//" in name:
        return "it contains '//'"
    if ".." in name:
        return "it contains '..'"
    if "@{" in name:
        return "it contains '@{'"
    if name.endswith("."):
        return "it ends with '.'"
    for component in name.split("/"):
        if component.startswith("."):
            return "a '/'-separated component starts with '.'"
        if component.endswith(".lock"):
            return "a '/'-separated component ends with '.lock'"
    return None


def validate_name(name: str, what: str = "branch") -> str:
    """Return ``name`` unchanged if it is a valid branch or tag name, else raise InvalidName.

    The rules are git's ``check-ref-format``: no empty name, no ``..``, no ASCII control
    character, space or any of ``~ ^ : ? * [ \\``, no leading ``-``, no leading or trailing
    ``/``, no ``//``, no trailing ``.``, no component that starts with ``.`` or ends with
    ``.lock``, no ``@{``, not the lone name ``@``, and at most 255 characters. ``what`` ("branch",
    "tag") only words the error message.
    """
    if not isinstance(name, str):
        raise InvalidName(f"invalid {what} name {name!r}: names are strings, e.g. 'digits-head'")
    problem = _problem(name)
    if problem is not None:
        raise InvalidName(
            f"invalid {what} name {name!r}: {problem}; "
            "choose a name like 'digits-head' or 'team/digits' (git ref rules)"
        )
    return name
