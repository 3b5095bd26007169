"""The lineage browser at scale: first paint of ``tlreg ui``'s lineage page on a registry of
10^5 checkpoints, in a real headless Chromium, against the same page at 10^4 in the same run.

    python bench/ui_bench.py                       # 10^4 and 10^5 checkpoints, SQLite
    python bench/ui_bench.py --sizes 10000,200000 --backend postgres
    python bench/ui_bench.py --quick               # 10^4 only, fewer loads

Each size gets a registry shaped as ``registry_bench.py`` populates it (chains of 1,000
steps, nine branches off each group's first chain, tags), served by the real ``tlreg ui``
process. For each page setting (lanes collapsed, the default; and ``collapse=0``, every
checkpoint of the page drawn) the bench loads the lineage page ``--loads`` times in Chromium
(cache off) and reads the browser's own ``first-contentful-paint`` and the server's response
time (``responseEnd - requestStart``). Reported: medians, and the ratio of each size to the
smallest: the page costs what a page costs, not what the registry holds.

Needs Debian's chromium and chromium-driver (``make browser``).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registry_bench import backend_url, populate

from tlreg.registry import Registry
from tlreg.training import Settings, write_settings

PAGES = {"collapsed": "lineage", "every node": "lineage?collapse=0"}


def _populate(url: str, n: int) -> None:
    with Registry(url) as reg:
        populate(reg, n)


def _serve(home: Path) -> tuple[subprocess.Popen[str], str]:
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
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/", line)
    if not found:
        proc.kill()
        raise SystemExit(f"tlreg ui did not start: {line!r}")
    return proc, found.group(0)


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1600,1000", "--disable-extensions", "--disk-cache-size=0",
    ):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


PAINT = """
const nav = performance.getEntriesByType("navigation")[0];
const fcp = performance.getEntriesByName("first-contentful-paint")[0];
return [fcp ? fcp.startTime : null, nav.responseEnd - nav.requestStart,
        document.querySelectorAll("svg.lineage g.node").length];
"""


def measure(driver: Any, url: str, loads: int) -> tuple[float, float, int]:
    """Median first-contentful-paint and server response (ms) over ``loads`` page loads."""
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    driver.get(url)  # warm-up: the server's first request imports and opens everything
    paints, responses, nodes = [], [], 0
    for _ in range(loads):
        driver.get("about:blank")
        driver.get(url)
        for _ in range(100):
            fcp, response, nodes = driver.execute_script(PAINT)
            if fcp is not None:
                break
            time.sleep(0.05)
        paints.append(fcp)
        responses.append(response)
    return statistics.median(paints), statistics.median(responses), nodes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="10000,100000", help="comma-separated sizes (multiples of 10,000)"
    )
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--loads", type=int, default=9, help="page loads per measurement")
    parser.add_argument("--quick", action="store_true", help="10,000 only; 3 loads")
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    loads = 3 if args.quick else args.loads
    results: dict[int, dict[str, tuple[float, float, int]]] = {}
    driver = _browser()
    try:
        for n in sizes:
            with backend_url(args.backend) as url, tempfile.TemporaryDirectory() as tmp:
                home = Path(tmp)
                t0 = time.perf_counter()
                _populate(url, n)
                store = str(home / "store")
                write_settings(Settings(home=home, registry_url=url, store_url=store))
                print(
                    f"{args.backend}, {n:,} checkpoints (populated in "
                    f"{time.perf_counter() - t0:.0f} s), load average "
                    f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
                    flush=True,
                )
                proc, base = _serve(home)
                try:
                    results[n] = {}
                    for name, path in PAGES.items():
                        fcp, response, nodes = measure(driver, base + path, loads)
                        results[n][name] = (fcp, response, nodes)
                        print(
                            f"  {name:<11} first paint {fcp:7.0f} ms   server {response:6.0f} ms"
                            f"   {nodes} nodes",
                            flush=True,
                        )
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
    finally:
        driver.quit()
    small = sizes[0]
    print(f"\n| checkpoints | page | first paint (ms) | server (ms) | nodes | paint vs {small:,} |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for name in PAGES:
            fcp, response, nodes = results[n][name]
            ratio = fcp / results[small][name][0]
            print(f"| {n:,} | {name} | {fcp:.0f} | {response:.0f} | {nodes} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
