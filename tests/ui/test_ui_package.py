"""Everything the web UI serves ships in the wheel, and none of it points at the network."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "cli" / "ui"

pytestmark = pytest.mark.slow


def test_the_wheel_holds_every_template_and_asset_of_the_ui(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    [wheel] = tmp_path.glob("tlreg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assets = sorted(
        p.relative_to(UI).as_posix()
        for p in UI.rglob("*")
        if p.is_file() and p.parent.name in ("templates", "static")
    )
    assert len(assets) >= 9
    assert [a for a in assets if f"tlreg/cli/ui/{a}" not in names] == []


def test_no_template_or_asset_loads_anything_from_another_origin() -> None:
    for path in [*UI.glob("templates/*"), *UI.glob("static/*"), UI / "graph.py"]:
        text = path.read_text()
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>]*", text)
        assert [u for u in urls if u != "http://www.w3.org/2000/svg"] == [], path
