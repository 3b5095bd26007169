"""Names the UI tests share (a module of its own: ``conftest`` is not importable by name when
the whole suite is collected)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from demo_registry import Demo

HOSTILE_BRANCH = "<svg/onload=document.title='pwned'>"
"""A branch name the name rules allow, that is markup if pasted into HTML unescaped."""
HOSTILE_METRIC = "<img src=x onerror=\"document.title='pwned'\">"
HOSTILE_TAG = '"><script>document.title=1</script>'


@dataclass
class Served:
    url: str
    home: Path
    demo: Demo
    registry_url: str
    pid: int
