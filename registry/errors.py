"""Errors raised by the registry.

Every leaf also subclasses the matching builtin (so ``except LookupError`` keeps working) and
pickles, because Ray ships exceptions between processes. Messages are one line that names the
object and the next step.
"""

from __future__ import annotations

from tlreg.storage_backends.errors import TlregError


class RegistryError(TlregError):
    """Base class for every registry error."""


class BranchNotFound(RegistryError, LookupError):
    """The branch does not exist."""


class RefNotFound(RegistryError, LookupError):
    """No branch, tag, checkpoint id or id prefix matches the ref."""


class AmbiguousRef(RegistryError, LookupError):
    """A checkpoint id prefix matches more than one checkpoint."""


class EmptyBranch(RegistryError, LookupError):
    """The ref names a branch that has no checkpoint yet."""


class RunNotFound(RegistryError, LookupError):
    """No run has this id."""


class BranchExists(RegistryError, FileExistsError):
    """A branch with this name already exists."""


class BranchHasDescendants(RegistryError, ValueError):
    """A branch other branches were made from was not deleted (``git branch -d``'s refusal);
    ``force`` deletes it."""


class TagExists(RegistryError, FileExistsError):
    """A tag with this name already exists."""


class CheckpointExists(RegistryError, FileExistsError):
    """A checkpoint with this id was already committed."""


class InvalidName(RegistryError, ValueError):
    """A branch or tag name that git's check-ref-format rules refuse."""


class UnsupportedDatabase(RegistryError, ValueError):
    """The registry URL names a database other than SQLite or PostgreSQL."""


class SchemaVersionError(RegistryError, RuntimeError):
    """The database's schema is older (run ``tlreg upgrade``) or newer (upgrade tlreg) than
    this tlreg's."""


class HeadMoved(RegistryError):
    """The branch head is not the one the committer expected (compare-and-swap failed).

    ``branch``, ``expected`` and ``actual`` carry the details; they survive pickling.
    """

    def __init__(
        self,
        message: str,
        *,
        branch: str | None = None,
        expected: str | None = None,
        actual: str | None = None,
    ) -> None:
        super().__init__(message)
        self.branch = branch
        self.expected = expected
        self.actual = actual


class RegistryUnavailable(RegistryError, ConnectionError):
    """The registry database cannot be reached (server stopped, network cut, file locked)."""


class UnsafeFilesystem(RegistryError, OSError):
    """A SQLite registry file on a network filesystem, where SQLite's locking is unreliable."""


class CheckpointPruned(RegistryError, LookupError):
    """The checkpoint was pruned by garbage collection: its lineage stays, its tensors may not."""


class CheckpointLost(RegistryError, LookupError):
    """The checkpoint is "lost": a node holding one of its local-only shares is gone and it
    never reached the shared store, so it cannot be read."""


class BeingCollected(RegistryError, FileNotFoundError):
    """A commit references store keys that garbage collection is deleting."""


class NotCollectable(RegistryError, ValueError):
    """``forget_objects`` was given a key that ``apply_gc`` did not hand out for deletion."""
