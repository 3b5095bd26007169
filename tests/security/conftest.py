"""Security suite: real components, the CLI driven as a user would (``make_shell``) or
in-process in an isolated home (``cli_harness``); the counts (the manifest fuzzer's) are
printed at the end of the run."""

from typing import Any

from cli_harness import home, snapshot, tlreg, weights_file
from e2e_harness import make_shell
from faultlib import summarise

__all__ = ["home", "make_shell", "snapshot", "tlreg", "weights_file"]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    summarise(terminalreporter)
