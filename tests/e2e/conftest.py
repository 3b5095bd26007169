"""End-to-end tests: a user's shell per test (``make_shell`` from ``e2e_harness``)."""

from e2e_harness import make_shell

__all__ = ["make_shell"]
