"""Fault-injection suite: the short setting runs in ``make test``, the long one in ``make stress``.

The counts (trials run, checkpoints committed, checkpoints lost, corruptions detected, orphans
collected) are printed at the end of the run, whatever the setting.
"""

from __future__ import annotations

from typing import Any

from faultlib import COUNTS, STRESS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not COUNTS:
        return
    terminalreporter.section(f"fault injection ({'stress' if STRESS else 'short'} setting)")
    for key in sorted(COUNTS):
        terminalreporter.write_line(f"{key:<56} {COUNTS[key]:>8}")
