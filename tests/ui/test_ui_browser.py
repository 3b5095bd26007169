"""The lineage browser in a real headless Chromium: what a user sees on each page, with a
screenshot of each written to .pytest-artifacts/ui/ for review."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from demo_registry import CURVES
from ui_harness import HOSTILE_BRANCH, Served

from tlreg.ckpt import read_manifest
from tlreg.cli.visual import shared_bytes
from tlreg.registry import Registry
from tlreg.storage_backends import open_store

pytestmark = pytest.mark.slow


def _wait(driver: Any, css: str, timeout: float = 30) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def _shot(driver: Any, artifacts: Path, name: str) -> None:
    path = artifacts / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 5_000  # a rendered page, not a blank one


def test_lineage_page_shows_every_branch_and_the_bytes_each_checkpoint_shares(
    served: Served, browser: Any, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.url + "lineage")
    _wait(browser, "svg.lineage g.node")
    lanes = [
        el.get_attribute("data-branch")
        for el in browser.find_elements(By.CSS_SELECTOR, "svg.lineage g.lane")
    ]
    assert lanes == ["base", "upper-head", "upper-full", "upper-scratch"]
    # A branch with no checkpoint of its own is a head badge on the checkpoint it points at.
    badges = browser.find_elements(By.CSS_SELECTOR, "text.badge title")
    assert f"head: {HOSTILE_BRANCH}" in [b.get_attribute("textContent") for b in badges]
    # Every node says what it wrote and what it shares, as the registry records it.
    with Registry(served.registry_url) as reg:
        records = {r.id: r for r in reg.checkpoints()}
        store = open_store(str(served.home / "store"))
        head = records[served.demo.heads["upper-head"]]
        first_on_head = next(
            r for r in records.values() if r.branch == "upper-head" and r.step == 20
        )
        frozen_shared = shared_bytes(
            read_manifest(store, first_on_head.manifest),
            read_manifest(store, records[served.demo.base_head].manifest),
        )
    nodes = browser.find_elements(By.CSS_SELECTOR, "svg.lineage g.node")
    assert len(nodes) == len(records)  # 12 demo checkpoints, none collapsed
    for node in nodes:
        r = records[node.get_attribute("data-id")]
        assert int(node.get_attribute("data-new-bytes")) == r.new_bytes
        shared = max(0, r.logical_bytes - r.new_bytes)  # a pack's header counts as new
        assert int(node.get_attribute("data-shared-bytes")) == shared
        assert f"step {r.step}" in node.text
    # The branch with frozen features wrote only its head: its first checkpoint shares the
    # features with base, and says so on the page.
    assert frozen_shared == 19200  # features.* (16*9 + 16 + 32*16*9 + 32 floats)
    assert (
        "head: upper-head"
        in browser.find_element(By.CSS_SELECTOR, f'g.node[data-id="{head.id}"]').text
    )
    edge_kinds = {
        e.get_attribute("data-kind") for e in browser.find_elements(By.CSS_SELECTOR, "path.edge")
    }
    assert edge_kinds == {"continue", "branch"}
    # What changed against the parent arrives after the first paint (from the manifests).
    _wait_text(
        browser, f'text.changed[data-id="{first_on_head.id}"]', "Δ 2 tensors · 18.8 KiB shared"
    )
    _shot(browser, artifacts, "lineage")


def _wait_text(driver: Any, css: str, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, css).text == text)


def test_clicking_a_node_opens_its_checkpoint_page_with_tensors_and_diff(
    served: Served, browser: Any, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.url + "lineage")
    _wait(browser, "svg.lineage g.node")
    target = served.demo.heads["upper-head"]
    browser.find_element(By.CSS_SELECTOR, f'g.node[data-id="{target}"] rect.box').click()
    title = _wait(browser, "h1#title")
    assert browser.current_url == f"{served.url}checkpoint/{target}"
    assert title.text == "upper-head@60"
    summary = browser.find_element(By.ID, "diff-summary").text
    assert summary.startswith("2 tensors differ, 5 identical")  # only head.* changed
    groups = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "details.group summary")]
    assert groups[0].startswith("model: 6 tensors")
    _shot(browser, artifacts, "checkpoint")
    # Diff against any other checkpoint: the scratch branch shares nothing.
    browser.get(f"{served.url}checkpoint/{target}?against=upper-scratch")
    summary = _wait(browser, "#diff-summary").text
    assert summary.startswith("6 tensors differ,")


def test_comparison_page_draws_both_curves_and_the_table(
    served: Served, browser: Any, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(
        served.url + "compare?ref=upper-scratch&ref=upper-head&metric=val_accuracy&target=0.9"
    )
    img = _wait(browser, "img#chart")
    browser.execute_script(
        "return arguments[0].decode ? arguments[0].decode() : null", img
    )  # wait until the chart image has loaded
    assert browser.execute_script("return arguments[0].naturalWidth", img) > 300
    rows = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in browser.find_elements(By.CSS_SELECTOR, "#compare-table tr")[1:]
    ]
    assert [r[:5] for r in rows] == [
        ["upper-scratch", "-", "60", "3.00", "0.9"],
        ["upper-head", "base@60", "20", "1.00", "0.96"],
    ]
    # Both curves are in the chart: one line per branch, labelled in its legend.
    chart = browser.execute_script(
        "return fetch(arguments[0]).then(r => r.text())", img.get_attribute("src")
    )
    assert chart.count('id="line2d_') >= 2
    assert len(CURVES["upper-head"]) == 6
    _shot(browser, artifacts, "compare")


def test_runs_page_lists_every_run_with_status_and_final_metric(
    served: Served, browser: Any, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.url + "runs")
    _wait(browser, "#runs")
    rows = browser.find_elements(By.CSS_SELECTOR, "#runs tr")[1:]
    assert len(rows) == 5
    first = [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")]
    assert first[1:3] == ["base", "succeeded"]
    assert first[5:8] == ["60", "val_accuracy=0.9", "3/3"]
    _shot(browser, artifacts, "runs")
