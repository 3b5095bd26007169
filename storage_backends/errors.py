"""Errors raised by stores. Leaves also subclass the matching builtin, and all of them pickle
(they cross Ray process boundaries)."""

from __future__ import annotations


class TlregError(Exception):
    """The root of every tlreg error: ``except TlregError`` catches what any package raises.

    It lives here, in the package every other one sits on (DESIGN.md §2's arrows end here);
    ``tlreg.ckpt``, ``tlreg.registry`` and ``tlreg.training`` derive their own base from it.
    """


class StoreError(TlregError):
    """Base class for every storage error; the message names the object and the next step."""


class ObjectNotFound(StoreError, FileNotFoundError):
    """The key does not exist in the store."""


class UnknownScheme(StoreError, ValueError):
    """No backend handles the URL's scheme."""


class BackendMissing(StoreError, ImportError):
    """The backend exists but its optional dependency is not installed."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store could not be reached or refused the request (credentials, missing bucket)."""


class InvalidKey(StoreError, ValueError):
    """A key that is not a relative, normalised '/'-separated path."""
