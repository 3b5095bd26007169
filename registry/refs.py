"""Names for checkpoints: branches and tags, and resolving a ref (a branch, a tag, a
checkpoint id or an id prefix) to its checkpoint row.

The functions take the caller's session, so that a ref is resolved in the transaction that
uses it; :class:`Refs` holds the public calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select, update

from tlreg.registry import models as m
from tlreg.registry.engine import Database, chunks
from tlreg.registry.errors import (
    AmbiguousRef,
    BranchExists,
    BranchHasDescendants,
    BranchNotFound,
    CheckpointLost,
    CheckpointPruned,
    EmptyBranch,
    RefNotFound,
    TagExists,
)
from tlreg.registry.gc import gc_lock
from tlreg.registry.names import did_you_mean, shown, validate_name
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
        raise BranchNotFound(
            f"branch {shown(name)} does not exist{_close_names(s, name, tags=False)}: "
            f"{BRANCHES_HINT}"
        )
    return row


def _close_names(s: Session, word: str, *, tags: bool = True) -> str:
    """A did-you-mean for a misspelled branch (or tag) name, or ""."""
    names = list(s.exec(select(m.Branch.name)).all())
    if tags:
        names += s.exec(select(m.Tag.name)).all()
    return did_you_mean(word, names)


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
                f"branch {shown(ref)} has no checkpoint yet: train it ('tlreg train {ref}'), "
                "or branch from a ref that has one"
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
    raise RefNotFound(
        f"no branch, tag or checkpoint matches {shown(ref)}{_close_names(s, ref)}: {REFS_HINT}"
    )


def live(row: m.Checkpoint, action: str) -> m.Checkpoint:
    """``row``, unless garbage collection pruned it (CheckpointPruned) or it is lost
    (CheckpointLost), saying that it cannot ``action``."""
    if row.pruned is not None:
        raise CheckpointPruned(
            f"checkpoint {row.id!r} was pruned by garbage collection on "
            f"{row.pruned:%Y-%m-%d %H:%M} UTC and its tensors may be gone: cannot {action}; "
            "pick a live checkpoint (see 'tlreg log')"
        )
    if row.tier == "lost":
        raise CheckpointLost(
            f"checkpoint {row.id!r} is lost: a node holding one of its local-only shares is "
            f"gone and it never reached the shared store: cannot {action}; pick a restorable "
            "checkpoint (see 'tlreg log')"
        )
    return row


def record(
    row: m.Checkpoint, parents: tuple[str, ...], nodes: Sequence[str] = ()
) -> CheckpointRecord:
    """The record of a checkpoint row whose parents (and nodes, for a non-shared one) are
    known."""
    return from_row(
        CheckpointRecord,
        row,
        parents=parents,
        metrics=decode_metrics(row.metrics),
        signature=None if row.signature is None else tuple(row.signature),
        nodes=tuple(sorted(nodes)),
    )


def nodes_of(s: Session, ids: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """The nodes recorded for each of ``ids`` that has some (checkpoint_node; sorted).
    Callers pass only the ids of non-shared checkpoints: shared ones have none."""
    found: dict[str, list[str]] = {}
    for chunk in chunks(list(ids)):
        rows = s.connection().execute(
            select(m.CheckpointNode.checkpoint_id, m.CheckpointNode.node_id)
            .where(col(m.CheckpointNode.checkpoint_id).in_(chunk))
            .order_by(col(m.CheckpointNode.checkpoint_id), col(m.CheckpointNode.node_id))
        )
        for cid, node in rows:
            found.setdefault(cid, []).append(node)
    return {cid: tuple(nodes) for cid, nodes in found.items()}


def run_nodes(s: Session, run_ids: Sequence[int]) -> dict[int, dict[int, str]]:
    """Rank -> node id of each of ``run_ids`` that recorded its nodes (schema v10)."""
    found: dict[int, dict[int, str]] = {}
    for chunk in chunks(list(run_ids)):
        for run_id, rank, node in s.connection().execute(
            select(m.RunNode.run_id, m.RunNode.rank, m.RunNode.node_id)
            .where(col(m.RunNode.run_id).in_(chunk))
            .order_by(col(m.RunNode.run_id), col(m.RunNode.rank))
        ):
            found.setdefault(run_id, {})[rank] = node
    return found


def records(s: Session, rows: Sequence[m.Checkpoint]) -> list[CheckpointRecord]:
    """Detach rows into records, fetching every row's parents (and a non-shared row's
    nodes) in a few batched queries."""
    nodes = nodes_of(s, [r.id for r in rows if r.tier != "shared"])
    parents: dict[str, list[str]] = {r.id: [] for r in rows}
    for chunk in chunks(list(parents)):
        edges = s.exec(
            select(m.Edge.child, m.Edge.parent)
            .where(col(m.Edge.child).in_(chunk))
            .order_by(col(m.Edge.child), col(m.Edge.position))
        ).all()
        for child, parent in edges:
            parents[child].append(parent)
    return [record(r, tuple(parents[r.id]), nodes.get(r.id, ())) for r in rows]


def _branched_from(s: Session, name: str) -> list[str]:
    on_branch = select(m.Checkpoint.id).where(m.Checkpoint.branch == name)
    rows = s.exec(
        select(m.Branch.name)
        .where(col(m.Branch.base).in_(on_branch), col(m.Branch.name) != name)
        .order_by(col(m.Branch.name))
    ).all()
    return list(rows)


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

    def branched_from(self, name: str) -> list[str]:
        """Names of the other branches whose base is a checkpoint committed on ``name`` (the
        branches made from it, as ``git branch -d`` knows unmerged work), sorted."""
        with self._session() as s:
            branch_row(s, name)
            return _branched_from(s, name)

    def delete_branch(self, name: str, *, force: bool = False) -> None:
        """Delete the branch name only; its checkpoints stay (reachable by id and tags).

        Without ``force`` a branch that other branches were made from is refused
        (BranchHasDescendants), as ``git branch -d`` refuses unmerged work: its task and its
        name are what those branches' lineage points back to. A branch with a live run is
        refused (BranchLeased), forced or not.
        """
        from tlreg.registry.leases import refuse_if_leased  # (leases imports this module)

        with self._session(write=True) as s:
            branch_row(s, name, lock=True)
            refuse_if_leased(s, name, "delete it")
            if not force:
                children = _branched_from(s, name)
                if children:
                    listed = ", ".join(children[:5]) + (", ..." if len(children) > 5 else "")
                    raise BranchHasDescendants(
                        f"branch {shown(name)} has {len(children)} branches made from it "
                        f"({listed}): delete those first, or force with 'tlreg branch -D {name}'"
                    )
            result = s.exec(delete(m.Branch).where(col(m.Branch.name) == name))
            if result.rowcount != 1:
                raise BranchNotFound(f"branch {shown(name)} does not exist: {BRANCHES_HINT}")

    def rename_branch(self, old: str, new: str) -> Branch:
        """Rename branch ``old`` to ``new`` (``git branch -m``): its head, base, task and the
        checkpoints and runs recorded on it move to the new name, in one transaction.

        Raises BranchNotFound, InvalidName, BranchExists (also when checkpoints of a deleted
        branch still carry the name ``new``: they would mix with this branch's), BranchLeased
        (the branch has a live run).
        """
        from tlreg.registry.leases import refuse_if_leased  # (leases imports this module)

        validate_name(new, "branch")
        with self._session(write=True) as s:
            row = branch_row(s, old, lock=True)
            refuse_if_leased(s, old, "rename it")
            taken = s.get(m.Branch, new) is not None or (
                old != new
                and s.exec(select(m.Checkpoint.id).where(m.Checkpoint.branch == new)).first()
                is not None
            )
            if taken:
                raise BranchExists(
                    f"branch {shown(new)} already exists (or checkpoints of a deleted branch "
                    f"carry that name): pick another name or {BRANCHES_HINT}"
                )
            renamed = m.Branch(
                name=new, head=row.head, base=row.base, task=row.task, created=row.created
            )
            # insert the new name first: tables holding branch names point at rows that exist
            s.exec(self._insert(m.Branch).values(**renamed.model_dump()))
            s.flush()
            s.exec(update(m.Checkpoint).where(col(m.Checkpoint.branch) == old).values(branch=new))
            s.exec(update(m.Run).where(col(m.Run.branch) == old).values(branch=new))
            s.exec(delete(m.Branch).where(col(m.Branch.name) == old))
            return from_row(Branch, renamed)

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

    def resolve_live(self, ref: str, action: str) -> CheckpointRecord:
        """:meth:`resolve`, refusing a checkpoint garbage collection pruned with
        CheckpointPruned, whose message gives the gc date and says it cannot ``action`` (e.g.
        "export it"): a pruned checkpoint is called pruned, never damaged."""
        with self._session() as s:
            return records(s, [live(resolve_row(s, ref), action)])[0]

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
