"""Bad-input suite: every case drives the real CLI in an isolated home (``cli_harness``)."""

from cli_harness import home, snapshot, tlreg, weights_file

__all__ = ["home", "snapshot", "tlreg", "weights_file"]
