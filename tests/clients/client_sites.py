"""Installing and running the real clients of tests/clients.

Clients that must run at several versions at once (transformers) are installed from PyPI,
each into a folder of its own under :data:`CLIENTS_DIR` (once; later runs reuse it), and run
in a subprocess with that folder first on ``PYTHONPATH``: this suite's own environment keeps
its versions. Clients one version of which suffices (xarray, dask) are dev extras.

The folders live in the user's cache, not in the checkout: CI starts from a clean checkout
(a new ``.venv``), and installing both transformers (~500 MB) takes minutes (2 min 17 s on a
loaded 2-core machine), on every run if they lived in ``.venv``; a runner that keeps its
home installs them once. ``TLREG_CLIENTS_DIR`` puts them elsewhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

CLIENTS_DIR = Path(
    os.environ.get("TLREG_CLIENTS_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "tlreg-clients"
    / f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
)
"""Where :func:`client_site` installs clients: one folder per ``NAME-VERSION``, under a
folder per Python and platform (the clients' dependencies have compiled wheels)."""


def client_site(name: str, version: str) -> Path:
    """A folder holding ``name==version`` and its dependencies (not torch: the subprocess
    imports this environment's), installed from PyPI on first use. Wheels only: a version
    that has no wheel for this Python cannot be a version our users run here either."""
    site = CLIENTS_DIR / f"{name}-{version}"
    if (site / ".complete").exists():
        return site
    shutil.rmtree(site, ignore_errors=True)  # an install that was cut short
    CLIENTS_DIR.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-{version}.", dir=CLIENTS_DIR))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", "--target", str(partial), f"{name}=={version}"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(f"cannot install {name}=={version} from PyPI: {proc.stderr[-2000:]}")
        (partial / ".complete").touch()
        try:
            partial.rename(site)  # atomic: a concurrent run sees no half-installed folder
        except OSError:  # another run finished first: use its folder
            if not (site / ".complete").exists():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return site


def run_client(site: Path, script: Path, *args: str, timeout: float = 300) -> str:
    """Run ``script`` with ``site`` first on the path, offline; return its stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *sys.path[1:]]),
        "HF_HUB_OFFLINE": "1",  # from local folders only: no hub
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout
