"""End-to-end harness: the real ``tlreg`` command, in-process for quick commands, in a
subprocess for ``train`` (which starts its own local Ray, as it does for a user, or joins the
cluster that ``RAY_ADDRESS`` in the shell's environment names)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlreg.cli.main import cli


class Shell:
    """A user's shell: ``TLREG_*`` settings for one throw-away home, and ``env`` on top."""

    def __init__(
        self,
        tmp_path: Path,
        registry_url: str,
        store_url: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.home = tmp_path / "home"
        self.store_url = store_url or str(self.home / "store")
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TLREG_")},
            "TLREG_HOME": str(self.home),
            "TLREG_REGISTRY_URL": registry_url,
            "TLREG_STORE_URL": self.store_url,
            # Otherwise every ray.train.report waits ~2 s for the controller's poll.
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
            **(env or {}),
        }

    def tlreg(self, *args: str) -> str:
        """``tlreg ARGS`` in-process; asserts success and returns its output."""
        runner = CliRunner(env={k: v for k, v in self.env.items() if k.startswith("TLREG")})
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """``tlreg ARGS`` as its own process, output captured."""
        return subprocess.Popen(
            [sys.executable, "-m", "tlreg.cli", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, *args: str) -> str:
        """``tlreg ARGS`` as its own process; asserts success and returns its stdout."""
        proc = self.popen(*args)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return out


@pytest.fixture
def make_shell(tmp_path: Path) -> Callable[..., Shell]:
    """``make_shell(registry_url, store_url=None)``: a :class:`Shell` for a fresh home."""
    return lambda registry_url, store_url=None: Shell(tmp_path, registry_url, store_url)
