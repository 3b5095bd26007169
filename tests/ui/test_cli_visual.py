"""``tlreg compare``, ``tlreg plot`` and ``tlreg lineage --html/--svg`` on a demo-like
registry, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from demo_registry import Demo, build_demo
from PIL import Image

from tlreg.registry import Registry


@pytest.fixture
def demo(tlreg: Any, home: Path, registry_url: str) -> Demo:
    assert tlreg("init").exit_code == 0
    with Registry(registry_url) as reg:
        return build_demo(reg, str(home / "store"))


def test_compare_gives_steps_and_seconds_to_target_final_value_and_bytes(
    tlreg: Any, demo: Demo, snapshot: Any
) -> None:
    before = snapshot()
    args = ["upper-scratch", "upper-head", "upper-full", "-m", "val_accuracy", "-t", "0.9"]
    result = tlreg("compare", *args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == [
        "BRANCH", "FROM", "STEPS", "TO", "0.9", "SECONDS", "FINAL", "val_accuracy", "NEW",
        "BYTES", "SHARED", "WITH", "ANCESTOR",
    ]  # fmt: skip
    assert [line.split()[:5] for line in lines[1:]] == [
        ["upper-scratch", "-", "60", "3.00", "0.9"],
        ["upper-head", "base@60", "20", "1.00", "0.96"],
        ["upper-full", "base@60", "30", "1.50", "0.98"],
    ]
    doc = json.loads(tlreg("compare", *args, "--json").output)
    rows = {r["branch"]: r for r in doc["rows"]}
    # upper-head froze the features: its head shares them with base's head, byte for byte.
    assert rows["upper-head"]["shared_with_ancestor_bytes"] == 19200
    assert rows["upper-full"]["shared_with_ancestor_bytes"] == 0
    assert rows["upper-scratch"]["shared_with_ancestor_bytes"] is None
    assert rows["upper-head"]["new_bytes"] < rows["upper-full"]["new_bytes"]
    assert rows["upper-head"]["ancestor"] == demo.base_head
    assert (rows["upper-full"]["steps_to_target"], rows["upper-full"]["final_step"]) == (30, 60)
    table = list(csv.DictReader(io.StringIO(tlreg("compare", *args, "--csv").output)))
    assert [(r["branch"], r["steps_to_target"]) for r in table] == [
        ("upper-scratch", "60"), ("upper-head", "20"), ("upper-full", "30"),
    ]  # fmt: skip
    assert snapshot() == before  # reading only


def test_compare_lower_is_better_and_unreached_targets(tlreg: Any, demo: Demo) -> None:
    result = tlreg("compare", "base", "upper-head", "-m", "val_accuracy", "-t", "0.95", "--json")
    rows = json.loads(result.output)["rows"]
    assert [(r["steps_to_target"], r["seconds_to_target"]) for r in rows] == [
        (None, None), (40, 2.0),
    ]  # fmt: skip
    text = tlreg("compare", "base", "-m", "val_accuracy", "-t", "0.95").output
    assert text.splitlines()[1].split()[2:4] == ["not", "reached"]
    rows = json.loads(
        tlreg("compare", "base", "-m", "val_accuracy", "-t", "0.4", "--lower-is-better", "--json")
        .output
    )["rows"]  # fmt: skip
    assert rows[0]["steps_to_target"] == 10


def test_compare_and_plot_refuse_what_they_cannot_do_in_one_line(
    tlreg: Any, demo: Demo, tmp_path: Path
) -> None:
    cases = [
        (("compare", "base", "-m", "nope"), "Error: no compared branch logged metric 'nope'"),
        (("compare", "ghost", "-m", "val_accuracy"), "Error: no branch, tag or checkpoint"),
        (("compare", "base", "-m", "val_accuracy", "--json", "--csv"), "Error: --json and"),
        (("plot", "base", "-m", "val_accuracy", "-o", str(tmp_path / "out" / "x.gif")),
         "Error: cannot write a chart as '.gif'"),
        (("plot", "base", "-m", "nope", "-o", str(tmp_path / "out" / "x")),
         "Error: no compared branch logged metric 'nope'"),
    ]  # fmt: skip
    for args, start in cases:
        result = tlreg(*args)
        assert result.exit_code == 1, args
        assert len(result.output.splitlines()) == 1, result.output
        assert result.output.startswith(start), result.output
    assert not (tmp_path / "out").exists()


def test_plot_writes_png_and_svg_with_every_branch_and_the_branch_point(
    tlreg: Any, demo: Demo, tmp_path: Path
) -> None:
    out = tmp_path / "charts" / "compare"
    args = ("base", "upper-head", "upper-scratch", "-m", "val_accuracy", "-t", "0.9")
    result = tlreg("plot", *args, "-o", str(out))
    assert result.exit_code == 0, result.output
    png, svg = out.with_name("compare.png"), out.with_name("compare.svg")
    assert result.output.splitlines() == [str(png), str(svg)]
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] >= 800
    text = svg.read_text()
    # One line per branch, the target line, and the star marking where upper-head branched.
    assert len(re.findall(r'<g id="line2d_\d+">', text)) >= 5
    assert "upper-head (from base@60)" in text or "upper-head" in text
    seconds = tlreg("plot", *args, "--x", "seconds", "-o", str(tmp_path / "s.svg"))
    assert seconds.exit_code == 0 and (tmp_path / "s.svg").stat().st_size > 10_000


def test_lineage_html_is_one_self_contained_file_with_every_branch(
    tlreg: Any, demo: Demo, tmp_path: Path
) -> None:
    html, svg = tmp_path / "lineage.html", tmp_path / "lineage.svg"
    result = tlreg("lineage", "base", "--html", str(html), "--svg", str(svg))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [str(html), str(svg)]
    page = html.read_text()
    lanes = re.findall(r'<g class="lane" data-branch="([^"]+)"', page)
    assert lanes == ["base", "upper-head", "upper-full"]  # upper-scratch is unrelated
    assert "<script" not in page and "src=" not in page and 'href="http' not in page
    assert "<style>" in page  # styles inlined
    assert page.count('class="node ') == 9  # base and its descendants, not upper-scratch
    assert "Δ 2 tensors · 18.8 KiB shared" in page
    assert svg.read_text().startswith('<?xml version="1.0" encoding="UTF-8"?>\n<svg ')
