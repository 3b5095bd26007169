"""Errors raised by the checkpoint engine.

Leaves also subclass the matching builtin, every message is one line that names the object
and the next step, and all of them pickle (they cross Ray process boundaries): they carry
nothing but their message.
"""

from __future__ import annotations

from tlreg.storage_backends.errors import TlregError


class CheckpointError(TlregError):
    """Base class for every error of :mod:`tlreg.ckpt`."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """No manifest with that id exists in the store."""


class CorruptCheckpoint(CheckpointError, ValueError):
    """A manifest or an object is damaged, truncated or missing."""


class UnsupportedFormat(CheckpointError, ValueError):
    """The manifest or object was written in a format this version cannot read."""


class WriterError(CheckpointError, RuntimeError):
    """The writer process failed a request or died; the save it served wrote no manifest."""
