"""Branch and tag names: git's ``check-ref-format`` rules, so every name is also a valid git ref
component path and survives shells, URLs and file names, plus Unicode rules against
look-alikes (two names that print the same must not both exist)."""

from __future__ import annotations

import difflib
import unicodedata
from collections.abc import Iterable

from tlreg.registry.errors import InvalidName

MAX_NAME_LENGTH = 255
_FORBIDDEN_CHARS = frozenset(" ~^:?*[\\")
_INVISIBLE = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zs", "Zl", "Zp"})
"""Control, format (zero-width, bidi overrides), unassigned, private-use and surrogate code
points and non-ASCII spaces: nothing a reader can see or tell apart."""
_SCRIPT_MIXES = (
    frozenset({"LATIN", "CJK", "HIRAGANA", "KATAKANA", "KATAKANA-HIRAGANA"}),
    frozenset({"LATIN", "CJK", "BOPOMOFO"}),
    frozenset({"LATIN", "CJK", "HANGUL"}),
)
"""Scripts that one name may mix (Unicode TS #39's "highly restrictive" level): Japanese,
Chinese and Korean writing with Latin. Any other mix is refused as a possible look-alike."""


def shown(name: str, limit: int = 64) -> str:
    """``repr(name)`` for messages, cut to about ``limit`` characters with its length noted, so
    a 10,000-character name gives a readable one-line error."""
    if len(name) <= limit:
        return repr(name)
    return f"{name[:limit]!r}... ({len(name)} characters)"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` naming the closest of ``choices`` (difflib), or ""."""
    if not isinstance(word, str) or len(word) > 255:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def _char(ch: str) -> str:
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')}"


def _script(ch: str) -> str | None:
    """The script of a letter, from its Unicode name (LATIN, CYRILLIC, GREEK, ...)."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    return unicodedata.name(ch, "UNKNOWN").split(" ")[0]


def _unicode_problem(name: str) -> str | None:
    """Refuse names that can look like another name: invisible or format characters,
    compatibility forms (fullwidth, ligatures), unnormalised text, or letters of scripts that
    do not go together (a Cyrillic U+0430 inside a Latin 'main'). Accented Latin ('résumé'),
    Greek, Cyrillic, and Japanese with Latin ('モデル-v2') are fine."""
    if name.isascii():
        return None
    for ch in name:
        if unicodedata.category(ch) in _INVISIBLE:
            return f"it contains the invisible, space-like or unassigned character {_char(ch)}"
    if unicodedata.normalize("NFC", name) != name:
        return "it is not in Unicode normal form NFC (combining marks): type it as composed text"
    if unicodedata.normalize("NFKC", name) != name:
        odd = next(c for c in name if unicodedata.normalize("NFKC", c) != c)
        return f"it contains the compatibility character {_char(odd)}, a look-alike"
    scripts = {s for s in map(_script, name) if s is not None}
    if len(scripts) > 1 and not any(scripts <= mix for mix in _SCRIPT_MIXES):
        return f"it mixes letters of several scripts ({', '.join(sorted(scripts))}), a look-alike"
    return None


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
    lookalike = _unicode_problem(name)
    if lookalike is not None:
        return lookalike
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
            f"invalid {what} name {shown(name)}: {problem}; "
            "choose a name like 'digits-head' or 'team/digits' (git ref rules)"
        )
    return name
