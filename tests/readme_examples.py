"""The code examples of README.md, read from the README itself so that the README and the
tests that run its examples cannot drift apart. An example is the fenced block right after
a ``<!-- readme-example: NAME -->`` line."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_EXAMPLE = re.compile(
    r"^<!-- readme-example: (?P<name>[\w-]+) -->\n```(?P<lang>\w*)\n(?P<code>.*?)^```$",
    re.MULTILINE | re.DOTALL,
)


def readme_examples() -> dict[str, str]:
    """Every marked example of README.md: name -> code."""
    found: dict[str, str] = {}
    for m in _EXAMPLE.finditer(README.read_text()):
        assert m.group("name") not in found, f"two README examples named {m.group('name')}"
        found[m.group("name")] = m.group("code")
    return found


def readme_example(name: str) -> str:
    """The code of README example ``name`` (KeyError naming the ones there are)."""
    examples = readme_examples()
    if name not in examples:
        raise KeyError(f"README.md has no example {name!r}; it has {sorted(examples)}")
    return examples[name]
