"""Bad-input suite: every case drives the real CLI in an isolated home (``cli_harness``); the
counts of inputs refused and accepted are printed at the end of the run."""

from __future__ import annotations

from typing import Any

from cli_harness import home, snapshot, tlreg, weights_file
from faultlib import summarise

__all__ = ["home", "snapshot", "tlreg", "weights_file"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    summarise(terminalreporter)
