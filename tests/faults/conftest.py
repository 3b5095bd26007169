"""Fault-injection suite: the short setting runs in ``make test``, the long one in ``make stress``.

The counts (trials run, checkpoints committed, checkpoints lost, corruptions detected, orphans
collected) are printed at the end of the run, whatever the setting.
"""

from __future__ import annotations

from typing import Any

from faultlib import summarise


def pytest_terminal_summary(terminalreporter: Any) -> None:
    summarise(terminalreporter)
