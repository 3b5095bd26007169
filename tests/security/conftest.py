"""Security suite: real components, the CLI driven as a user would (``make_shell``) or
in-process in an isolated home (``cli_harness``)."""

from cli_harness import home, snapshot, tlreg, weights_file
from e2e_harness import make_shell

__all__ = ["home", "make_shell", "snapshot", "tlreg", "weights_file"]
