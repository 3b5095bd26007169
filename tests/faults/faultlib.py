"""Shared by the fault-injection cases: the trial setting and the session-wide tallies.

``TLREG_STRESS=1`` (what ``make stress`` sets) switches every case to its long setting.
"""

from __future__ import annotations

import os
from collections import Counter

STRESS = os.environ.get("TLREG_STRESS", "") not in ("", "0")

COUNTS: Counter[str] = Counter()
"""What the cases tally (trials, checkpoints committed and lost, corruptions detected, ...)."""


def trials(short: int, long: int) -> int:
    """How many times a case repeats: ``long`` under ``make stress``, else ``short``."""
    return long if STRESS else short
