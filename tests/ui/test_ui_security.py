"""The UI writes nothing, loads nothing from elsewhere, renders hostile names as text and
listens on loopback unless told otherwise."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from click.testing import CliRunner
from ui_harness import HOSTILE_BRANCH, HOSTILE_METRIC, HOSTILE_TAG, Served

from tlreg.cli.main import cli

pytestmark = pytest.mark.slow


def _request(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, data=b"x=1" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _db_bytes(served: Served) -> bytes:
    return (served.home / "registry.db").read_bytes()


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("path", ["lineage", "checkpoint/base", "api/changes", "nope"])
def test_every_method_but_get_and_head_is_refused_with_405(
    served: Served, method: str, path: str
) -> None:
    before = _db_bytes(served)
    status, headers, _ = _request(served.url + path, method)
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert _db_bytes(served) == before


def test_head_answers_like_get_without_a_body(served: Served) -> None:
    status, headers, body = _request(served.url + "lineage", "HEAD")
    assert (status, body) == (200, b"")
    assert headers["Content-Type"] == "text/html; charset=utf-8"


@pytest.mark.parametrize(
    "path",
    [
        "static/../server.py",
        "static/..%2fserver.py",
        "static/%2e%2e/%2e%2e/registry.db",
        "static/..%2f..%2f..%2fregistry.db",
        "static/pages.py",
        "static/templates%2fbase.html",
        "checkpoint/..%2f..%2fregistry.db",
        "..%2f..%2fregistry.db",
        "tlreg.toml",
        "registry.db",
    ],
)
def test_path_traversal_gets_404(served: Served, path: str) -> None:
    status, _, body = _request(served.url + path)
    assert status == 404
    assert b"SQLite format" not in body and b"import" not in body


def test_pages_load_nothing_from_another_origin(served: Served) -> None:
    for path in ("lineage", "compare?ref=base&metric=val_accuracy", "runs", "checkpoint/base"):
        status, headers, body = _request(served.url + path)
        assert status == 200
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        text = body.decode()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text


def test_hostile_branch_tag_and_metric_names_render_as_text(
    served: Served, browser: Any, artifacts: Path
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    pages = [
        "lineage",
        f"lineage?metric={urllib.request.quote(HOSTILE_METRIC)}",
        f"checkpoint/{served.demo.heads['upper-full']}",
        f"compare?ref={urllib.request.quote(HOSTILE_BRANCH)}&ref=upper-head"
        f"&metric={urllib.request.quote(HOSTILE_METRIC)}",
        "runs",
    ]
    for i, page in enumerate(pages):
        browser.get(served.url + page)
        browser.find_element(By.TAG_NAME, "main")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018
        assert browser.title.endswith("· tlreg")  # the payloads set document.title
        assert browser.find_elements(By.CSS_SELECTOR, "main script, main img[src=x]") == []
        browser.save_screenshot(str(artifacts / f"hostile-{i}.png"))
    # ... and are shown as the text they are.
    browser.get(served.url + "lineage")
    badges = browser.find_elements(By.CSS_SELECTOR, "text.badge title")
    assert f"head: {HOSTILE_BRANCH}" in [b.get_attribute("textContent") for b in badges]
    browser.get(served.url + f"checkpoint/{served.demo.heads['upper-full']}")
    assert f"tag: {HOSTILE_TAG}" in browser.find_element(By.TAG_NAME, "main").text
    browser.get(
        served.url + f"compare?ref={urllib.request.quote(HOSTILE_BRANCH)}"
        f"&metric={urllib.request.quote(HOSTILE_METRIC)}"
    )
    assert HOSTILE_BRANCH in browser.find_element(By.ID, "compare-table").text
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "select[name=metric] option")]
    assert HOSTILE_METRIC in options


def test_the_server_listens_on_loopback_only_by_default(served: Served) -> None:
    ports = [
        c.laddr
        for c in psutil.Process(served.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert ports and all(addr.ip == "127.0.0.1" for addr in ports)


def test_another_host_only_when_asked_and_with_a_warning(served: Served) -> None:
    busy = socket.socket()
    busy.bind(("0.0.0.0", 0))
    busy.listen()
    try:
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli,
            ["--home", str(served.home), "ui", "--host", "0.0.0.0", "--port", str(port)],
            env={"TLREG_REGISTRY_URL": None, "TLREG_STORE_URL": None},
        )
    finally:
        busy.close()
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("Warning: listening on 0.0.0.0: anyone who can reach")
    assert lines[-1].startswith(f"Error: cannot listen on 0.0.0.0:{port} (")
    assert lines[-1].endswith("pick another --port")
