"""UI tests: one demo-like registry (SQLite; the registry's own tests cover PostgreSQL), served
by the real ``tlreg ui`` command in a subprocess, driven by Debian's Chromium through
selenium. Screenshots go to ``.pytest-artifacts/ui/`` for review.

``make test`` installs chromium and chromium-driver when missing; without them the browser
tests fail with the install command (they are never silently skipped).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_harness import home, snapshot, tlreg, weights_file
from demo_registry import Demo, build_demo
from ui_harness import HOSTILE_BRANCH, HOSTILE_METRIC, HOSTILE_TAG, Served

from tlreg.registry import Registry
from tlreg.training import Settings, write_settings

__all__ = ["home", "snapshot", "tlreg", "weights_file"]

ARTIFACTS = Path(__file__).resolve().parents[2] / ".pytest-artifacts" / "ui"


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, Demo]]:
    """A tlreg home holding the demo registry, plus the hostile names of the security tests."""
    home = tmp_path_factory.mktemp("ui-home")
    url = f"sqlite:///{home / 'registry.db'}"
    store = str(home / "store")
    write_settings(Settings(home=home, registry_url=url, store_url=store))
    with Registry(url) as reg:
        reg.set_meta("store_url", store)
        demo = build_demo(reg, store)
        reg.create_branch(HOSTILE_BRANCH, from_ref="upper-head")
        run = reg.start_run(HOSTILE_BRANCH, {})
        reg.log_metrics(run.id, 10, {HOSTILE_METRIC: 0.5, "val_accuracy": 0.7})
        reg.finish_run(run.id, status="failed", error="<b>boom</b> & </td>")
        reg.tag("upper-full", HOSTILE_TAG)
    yield home, url, demo


@pytest.fixture(scope="session")
def served(demo_home: tuple[Path, str, Demo]) -> Iterator[Served]:
    """``tlreg ui --port 0`` on the demo home, as a user starts it; stopped at the end."""
    home, url, demo = demo_home
    env = {**os.environ, "TLREG_HOME": str(home)}
    for var in ("TLREG_REGISTRY_URL", "TLREG_STORE_URL"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlreg.cli", "ui", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if found:
                yield Served(found.group(0), home, demo, url, proc.pid)
                return
        pytest.fail(f"tlreg ui did not start: {line!r}, exit {proc.poll()}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium (Debian's) driven by selenium through Debian's chromedriver."""
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(
            "browser tests need Debian's chromium and chromium-driver: "
            "apt-get install -y chromium chromium-driver (make test does it)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1600,1000", "--no-first-run", "--disable-extensions",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
