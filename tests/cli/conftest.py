"""CLI tests: an isolated tlreg home per test (fixtures from ``cli_harness``)."""

from cli_harness import home, snapshot, tlreg, weights_file

__all__ = ["home", "snapshot", "tlreg", "weights_file"]
