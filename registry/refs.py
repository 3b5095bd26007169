"""Names for checkpoints: branches and tags, and resolving a ref (a branch, a tag, a
checkpoint id or an id prefix) to its checkpoint row.

The functions take the caller's session, so that a ref is resolved in the transaction that
uses it; :class:`Refs` holds the public calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from tlreg.registry import models as m
from tlreg.registry.engine import Database, chunks
from tlreg.registry.errors import (
    AmbiguousRef,
    BranchExists,
    BranchNotFound,
    CheckpointPruned,
    EmptyBranch,
    RefNotFound,
    TagExists,
)
from tlreg.registry.gc import gc_lock
from tlreg.registry.names import shown, validate_name
from tlreg.registry.records import Branch, CheckpointRecord, Tag, decode_metrics, from_row

MIN_PREFIX = 4
"""Shortest checkpoint id prefix that ``resolve`` accepts."""
BRANCHES_HINT = "list branches with 'tlreg branches'"
REFS_HINT = "pass a branch, a tag or a checkpoint id (see 'tlreg branches' and 'tlreg log')"


def unstorable(name: str) -> bool:
    """Whether no stored name can equal ``name`` (PostgreSQL text refuses NUL characters)."""
    return "\x00" in name


def branch_row(s: Session, name: str, *, lock: bool = False) -> m.Branch:
    """The row of branch ``name`` (``lock``: FOR UPDATE); raises BranchNotFound."""
    stmt = select(m.Branch).where(m.Branch.name == name)
    if lock:
        stmt = stmt.with_for_update()
    row = None if unstorable(name) else s.exec(stmt).first()
    if row is None:
        raise BranchNotFound(f"branch {shown(name)} does not exist: {BRANCHES_HINT}")
    return row


def checkpoint_row(s: Session, checkpoint_id: str) -> m.Checkpoint:
    """The row of the checkpoint with exactly this id; raises RefNotFound."""
    row = s.get(m.Checkpoint, checkpoint_id)
    if row is None:
        raise RefNotFound(f"checkpoint {checkpoint_id!r} does not exist: {REFS_HINT}")
    return row


def resolve_row(s: Session, ref: str) -> m.Checkpoint:
    """The checkpoint row ``ref`` names (see :meth:`Refs.resolve`)."""
    if not isinstance(ref, str) or not ref:
        raise RefNotFound(f"empty ref {shown(ref)}: {REFS_HINT}")
    if unstorable(ref):
        raise RefNotFound(f"no branch, tag or checkpoint matches {shown(ref)}: {REFS_HINT}")
    target: str | None = None
    branch = s.get(m.Branch, ref)
    if branch is not None:
        if branch.head is None:
            raise EmptyBranch(
                f"branch {shown(ref)} has no checkpoint yet: commit to it, or branch from a "
                "ref that has one"
            )
        target = branch.head
    else:
        tag = s.get(m.Tag, ref)
        if tag is not None:
            target = tag.checkpoint
    row = s.get(m.Checkpoint, target if target is not None else ref)
    if row is not None:
        return row
    if target is None and len(ref) >= MIN_PREFIX:
        id_col = col(m.Checkpoint.id)
        stmt = select(m.Checkpoint).where(id_col >= ref, id_col.startswith(ref, autoescape=True))
        if ord(ref[-1]) < 0x10FFFF:
            # An explicit upper bound turns the prefix match into an index range scan.
            stmt = stmt.where(id_col < ref[:-1] + chr(ord(ref[-1]) + 1))
        found = s.exec(stmt.order_by(id_col).limit(11)).all()
        if len(found) == 1:
            return found[0]
        if found:
            ids = ", ".join(c.id for c in found[:10]) + (", ..." if len(found) > 10 else "")
            raise AmbiguousRef(
                f"ref {shown(ref)} is a prefix of several checkpoints ({ids}): type more characters"
            )
    raise RefNotFound(f"no branch, tag or checkpoint matches {shown(ref)}: {REFS_HINT}")


def live(row: m.Checkpoint, action: str) -> m.Checkpoint:
    """``row``, unless garbage collection pruned it: then CheckpointPruned, saying that it
    cannot ``action``."""
    if row.pruned is not None:
        raise CheckpointPruned(
            f"checkpoint {row.id!r} was pruned by garbage collection on "
            f"{row.pruned:%Y-%m-%d %H:%M} UTC and its tensors may be gone: cannot {action}; "
            "pick a live checkpoint (see 'tlreg log')"
        )
    return row


def record(row: m.Checkpoint, parents: tuple[str, ...]) -> CheckpointRecord:
    """The record of a checkpoint row whose parents are known."""
    return from_row(
        CheckpointRecord,
        row,
        parents=parents,
        metrics=decode_metrics(row.metrics),
        signature=None if row.signature is None else tuple(row.signature),
    )


def records(s: Session, rows: Sequence[m.Checkpoint]) -> list[CheckpointRecord]:
    """Detach rows into records, fetching every row's parents in a few batched queries."""
    parents: dict[str, list[str]] = {r.id: [] for r in rows}
    for chunk in chunks(list(parents)):
        edges = s.exec(
            select(m.Edge.child, m.Edge.parent)
            .where(col(m.Edge.child).in_(chunk))
            .order_by(col(m.Edge.child), col(m.Edge.position))
        ).all()
        for child, parent in edges:
            parents[child].append(parent)
    return [record(r, tuple(parents[r.id])) for r in rows]


class Refs(Database):
    """Branches, tags, and the checkpoint a ref names."""

    # -- branches ------------------------------------------------------------------------

    def create_branch(
        self, name: str, *, from_ref: str | None = None, task: str | None = None
    ) -> Branch:
        """Create branch ``name``.

        Without ``from_ref`` the branch is an empty root (head None). Otherwise ``from_ref``
        (branch, tag, checkpoint id or prefix) is resolved and the new branch's head and base
        are that checkpoint, as in git. Raises BranchExists, InvalidName, RefNotFound.
        """
        validate_name(name, "branch")
        with self._session(write=True) as s:
            head = None
            if from_ref is not None:
                gc_lock(s, shared=True)
                head = live(resolve_row(s, from_ref), f"branch {shown(name)} from it").id
            row = m.Branch(name=name, head=head, base=head, task=task, created=m.utcnow())
            try:
                s.exec(self._insert(m.Branch).values(**row.model_dump()))
            except IntegrityError:
                raise BranchExists(
                    f"branch {shown(name)} already exists: pick another name or {BRANCHES_HINT}"
                ) from None
            return from_row(Branch, row)

    def get_branch(self, name: str) -> Branch:
        """The branch called ``name``; raises BranchNotFound."""
        with self._session() as s:
            return from_row(Branch, branch_row(s, name))

    def branches(self) -> list[Branch]:
        """Every branch, sorted by name."""
        with self._session() as s:
            rows = s.exec(select(m.Branch).order_by(col(m.Branch.name))).all()
            return [from_row(Branch, r) for r in rows]

    def delete_branch(self, name: str) -> None:
        """Delete the branch name only; its checkpoints stay (reachable by id and tags)."""
        with self._session(write=True) as s:
            result = s.exec(delete(m.Branch).where(col(m.Branch.name) == name))
            if result.rowcount != 1:
                raise BranchNotFound(f"branch {shown(name)} does not exist: {BRANCHES_HINT}")

    def branch_bytes(self, branch: str) -> tuple[int, int]:
        """(logical, new) bytes summed over the checkpoints committed on ``branch``."""
        with self._session() as s:
            branch_row(s, branch)
            logical, new = s.exec(
                select(
                    func.coalesce(func.sum(m.Checkpoint.logical_bytes), 0),
                    func.coalesce(func.sum(m.Checkpoint.new_bytes), 0),
                ).where(m.Checkpoint.branch == branch)
            ).one()
            return int(logical), int(new)

    # -- tags ----------------------------------------------------------------------------

    def tag(self, ref: str, name: str) -> Tag:
        """Name the checkpoint ``ref`` resolves to; raises TagExists, InvalidName, RefNotFound."""
        validate_name(name, "tag")
        with self._session(write=True) as s:
            gc_lock(s, shared=True)
            target = live(resolve_row(s, ref), f"tag it {shown(name)}").id
            row = m.Tag(name=name, checkpoint=target, created=m.utcnow())
            try:
                s.exec(self._insert(m.Tag).values(**row.model_dump()))
            except IntegrityError:
                raise TagExists(
                    f"tag {shown(name)} already exists: pick another name, or delete it with "
                    f"'tlreg tag -d {name}'"
                ) from None
            return from_row(Tag, row)

    def tags(self) -> list[Tag]:
        """Every tag, sorted by name."""
        with self._session() as s:
            rows = s.exec(select(m.Tag).order_by(col(m.Tag.name))).all()
            return [from_row(Tag, r) for r in rows]

    def delete_tag(self, name: str) -> None:
        """Delete a tag (the checkpoint stays); raises RefNotFound."""
        with self._session(write=True) as s:
            deleted = 0
            if not unstorable(name):
                deleted = s.exec(delete(m.Tag).where(col(m.Tag.name) == name)).rowcount
            if deleted != 1:
                raise RefNotFound(f"tag {shown(name)} does not exist: list tags with 'tlreg tag'")

    # -- one checkpoint ------------------------------------------------------------------

    def get(self, checkpoint_id: str) -> CheckpointRecord:
        """The checkpoint with exactly this id; raises RefNotFound."""
        with self._session() as s:
            return records(s, [checkpoint_row(s, checkpoint_id)])[0]

    def resolve(self, ref: str) -> CheckpointRecord:
        """The checkpoint ``ref`` names, trying in order: a branch (its head), a tag, a full
        checkpoint id, a unique id prefix of at least 4 characters.

        Raises EmptyBranch (a branch without checkpoints), AmbiguousRef (a prefix of several
        ids, listed in the message), RefNotFound.
        """
        with self._session() as s:
            return records(s, [resolve_row(s, ref)])[0]

    def objects_of(self, ref: str) -> dict[str, int]:
        """The objects the checkpoint ``ref`` resolves to references: hash -> nbytes, sorted by
        hash. A pruned checkpoint lists only the objects garbage collection has not forgotten."""
        with self._session() as s:
            cid = resolve_row(s, ref).id
            rows = s.exec(
                select(m.Object.hash, m.Object.nbytes)
                .join(m.CheckpointObject, col(m.CheckpointObject.object) == col(m.Object.hash))
                .where(m.CheckpointObject.checkpoint == cid)
                .order_by(col(m.Object.hash))
            ).all()
            return {h: int(n) for h, n in rows}
