"""Random create_branch / commit / merge / tag / branch -d/-D/-m / garbage-collection sequences keep
the lineage invariants, checked against a Python model of the DAG."""

from __future__ import annotations

import uuid
from collections import deque
from datetime import datetime, timezone

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tlreg.registry import (
    BeingCollected,
    BranchExists,
    BranchNotFound,
    CheckpointPruned,
    HeadMoved,
    Registry,
    TagExists,
)
from tlreg.registry.errors import BranchHasDescendants

OBJECT_SIZES = {f"obj{i}": 2**i for i in range(8)}


def distances(start: str, links: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """Shortest distance from ``start`` to everything reachable through ``links`` (BFS)."""
    dist: dict[str, int] = {}
    queue = deque([(start, 0)])
    while queue:
        node, d = queue.popleft()
        for nxt in links.get(node, ()):
            if nxt not in dist:
                dist[nxt] = d + 1
                queue.append((nxt, d + 1))
    return dist


class LineageMachine(RuleBasedStateMachine):
    """One example: names and object hashes carry a fresh prefix, so examples can share one
    database and the model only has to know about its own rows."""

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.reg = registry
        self.ns = uuid.uuid4().hex[:8]
        self.heads: dict[str, str | None] = {}
        self.branch_of: dict[str, str] = {}
        self.parents: dict[str, tuple[str, ...]] = {}
        self.tags: dict[str, str] = {}
        self.seen_objects: set[str] = set()
        self.bases: dict[str, str | None] = {}
        self.refs: dict[str, set[str]] = {}
        self.pruned: set[str] = set()
        self.doomed: set[str] = set()  # handed out by apply_gc, not yet forgotten
        self.counter = 0

    def _fresh(self, kind: str) -> str:
        self.counter += 1
        return f"{self.ns}-{kind}{self.counter:03d}"

    # -- rules ---------------------------------------------------------------------------

    @rule(data=st.data())
    def create_branch(self, data: st.DataObject) -> None:
        sources: list[str | None] = [None, *self.parents, *self.tags]
        sources += [b for b, head in self.heads.items() if head is not None]
        from_ref = data.draw(st.sampled_from(sources), label="from_ref")
        name = self._fresh("team/b" if data.draw(st.booleans(), label="nested") else "b")
        start = None
        if from_ref is not None:
            start = self.heads.get(from_ref) or self.tags.get(from_ref) or from_ref
        if start in self.pruned:
            with pytest.raises(CheckpointPruned):
                self.reg.create_branch(name, from_ref=from_ref)
            return
        branch = self.reg.create_branch(name, from_ref=from_ref)
        self.heads[name] = self.bases[name] = start
        assert (branch.head, branch.base) == (start, start)

    @precondition(lambda self: self.heads)
    @rule(data=st.data())
    def create_existing_branch_is_refused(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.heads)), label="name")
        with pytest.raises(BranchExists):
            self.reg.create_branch(name)

    @precondition(lambda self: self.heads)
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        branch = data.draw(st.sampled_from(sorted(self.heads)), label="branch")
        head = self.heads[branch]
        known = sorted(self.parents)
        mode = data.draw(st.sampled_from(["default", "explicit", "merge"]), label="mode")
        parents: list[str] | None = None
        if mode == "explicit" and known:
            parents = [data.draw(st.sampled_from(known), label="parent")]
        elif mode == "merge" and len(known) >= 2:
            parents = data.draw(
                st.lists(st.sampled_from(known), min_size=2, max_size=3, unique=True),
                label="parents",
            )
        names = data.draw(st.sets(st.sampled_from(sorted(OBJECT_SIZES))), label="objects")
        objects = {f"{self.ns}-{n}": OBJECT_SIZES[n] for n in names}
        explicit_head = data.draw(st.booleans(), label="explicit_head")
        cid = self._fresh("c")
        kwargs = {"expected_head": head} if explicit_head else {}
        if set(objects) & self.doomed:
            with pytest.raises(BeingCollected):
                self.reg.commit(branch, cid, step=0, parents=parents, objects=objects)
            return
        record = self.reg.commit(
            branch,
            cid,
            step=self.counter,
            parents=parents,
            objects=objects,
            # A merge's kind is the caller's word: lineage must not depend on it.
            kind=data.draw(st.sampled_from(["merge", "train"]), label="kind")
            if parents is not None and len(parents) > 1
            else "train",
            **kwargs,
        )
        expected_parents = tuple(parents) if parents is not None else ((head,) if head else ())
        new_bytes = sum(n for h, n in objects.items() if h not in self.seen_objects)
        # The model follows the database first, so a failed check below is the one reported
        # (and not a knock-on failure in teardown).
        self.seen_objects |= set(objects)
        self.refs[cid] = set(objects)
        self.parents[cid] = expected_parents
        self.branch_of[cid] = branch
        self.heads[branch] = cid
        assert record.parents == expected_parents
        assert record.new_bytes == new_bytes
        kinds = [e.kind for e in self.reg.edges(cid)]
        if len(expected_parents) > 1:
            assert kinds == ["merge"] * len(expected_parents)
        else:
            assert kinds == [
                "continue" if self.branch_of[p] == branch else "branch" for p in expected_parents
            ]

    @precondition(lambda self: len(self.parents) >= 2 and any(self.heads.values()))
    @rule(data=st.data())
    def stale_commit_is_refused(self, data: st.DataObject) -> None:
        branch = data.draw(
            st.sampled_from(sorted(b for b, h in self.heads.items() if h)), label="branch"
        )
        stale = data.draw(
            st.sampled_from([None, *sorted(c for c in self.parents if c != self.heads[branch])]),
            label="stale",
        )
        before = self.reg.get_branch(branch)
        with pytest.raises(HeadMoved):
            self.reg.commit(branch, self._fresh("x"), step=0, objects={}, expected_head=stale)
        assert self.reg.get_branch(branch) == before

    @precondition(lambda self: self.parents)
    @rule(data=st.data())
    def tag(self, data: st.DataObject) -> None:
        target = data.draw(st.sampled_from(sorted(self.parents)), label="target")
        if target in self.pruned:
            with pytest.raises(CheckpointPruned):
                self.reg.tag(target, self._fresh("t"))
            return
        if self.tags and data.draw(st.booleans(), label="duplicate"):
            with pytest.raises(TagExists):
                self.reg.tag(target, sorted(self.tags)[0])
            return
        name = self._fresh("t")
        tag = self.reg.tag(target, name)
        self.tags[name] = target
        assert tag.checkpoint == target

    @precondition(lambda self: self.heads)
    @rule(data=st.data())
    def delete_branch(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.heads)), label="branch")
        made_from = sorted(
            b
            for b, base in self.bases.items()
            if b != name and base is not None and self.branch_of.get(base) == name
        )
        assert self.reg.branched_from(name) == made_from
        force = data.draw(st.booleans(), label="force")
        if made_from and not force:  # git branch -d refuses; -D deletes
            with pytest.raises(BranchHasDescendants):
                self.reg.delete_branch(name)
            return
        self.reg.delete_branch(name, force=force)
        del self.heads[name], self.bases[name]

    @precondition(lambda self: self.heads)
    @rule(data=st.data())
    def rename_branch(self, data: st.DataObject) -> None:
        old = data.draw(st.sampled_from(sorted(self.heads)), label="branch")
        new = self._fresh("renamed")
        log = [r.id for r in self.reg.log(old)] if self.heads[old] else []
        renamed = self.reg.rename_branch(old, new)
        assert (renamed.name, renamed.head, renamed.base) == (new, self.heads[old], self.bases[old])
        self.heads[new] = self.heads.pop(old)
        self.bases[new] = self.bases.pop(old)
        for cid, branch in self.branch_of.items():
            if branch == old:
                self.branch_of[cid] = new
        assert ([r.id for r in self.reg.log(new)] if self.heads[new] else []) == log
        assert all(r.branch == new for r in self.reg.log(new) if self.branch_of[r.id] == new)
        with pytest.raises(BranchNotFound):
            self.reg.get_branch(old)

    @precondition(lambda self: self.parents)
    @rule(keep_last=st.sampled_from([None, 1, 2]), forget=st.booleans())
    def collect_garbage(self, keep_last: int | None, forget: bool) -> None:
        mine = set(self.parents)
        plan = self.reg.gc_plan(keep_last=keep_last, now=datetime.now(timezone.utc))
        expected = mine - self.pruned - self._kept(keep_last)
        assert set(plan.prune) & mine == expected
        done = self.reg.apply_gc(plan)
        assert set(done.prune) & mine == expected
        self.pruned |= expected
        # An object goes only when no unpruned checkpoint references it.
        referenced = set().union(*(self.refs[c] for c in mine - self.pruned))
        ns = f"{self.ns}-"
        handed_out = {h for h, _ in done.objects if h.startswith(ns)}
        assert handed_out == self.seen_objects - referenced
        self.doomed |= handed_out
        if forget:
            self.reg.forget_objects([h for h, _ in done.objects])
            self.seen_objects -= self.doomed
            for c in self.pruned:
                self.refs[c] -= self.doomed
            self.doomed.clear()

    def _kept(self, keep_last: int | None) -> set[str]:
        roots = {c for c in (*self.heads.values(), *self.bases.values()) if c is not None}
        roots |= set(self.tags.values())
        if keep_last is None:
            kept = set(roots)
            for c in roots:
                kept |= set(distances(c, self.parents))
            return kept
        for head in self.heads.values():
            for _ in range(keep_last):
                if head is None:
                    break
                roots.add(head)
                head = self.parents[head][0] if self.parents[head] else None
        return roots

    @precondition(lambda self: self.parents)
    @rule(data=st.data())
    def lineage_matches_the_model(self, data: st.DataObject) -> None:
        self._check_lineage(data.draw(st.sampled_from(sorted(self.parents)), label="checkpoint"))

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def branch_heads_match_the_model(self) -> None:
        # Per branch (not branches()): the database keeps growing over examples and shrinking.
        assert {b: self.reg.get_branch(b).head for b in self.heads} == self.heads

    @invariant()
    def heads_bases_and_tags_are_never_pruned(self) -> None:
        protected = {c for c in (*self.heads.values(), *self.bases.values()) if c is not None}
        protected |= set(self.tags.values())
        assert not protected & self.pruned

    def teardown(self) -> None:
        committed = {cid: self.reg.get(cid) for cid in self.parents}
        assert {cid: r.parents for cid, r in committed.items()} == self.parents
        assert {cid for cid, r in committed.items() if r.pruned is not None} == self.pruned
        assert {cid: set(self.reg.objects_of(cid)) for cid in self.parents} == self.refs
        # Every head and every tag names a committed checkpoint of this example, every edge
        # joins two of them (parents are only ever drawn from this example's checkpoints).
        assert all(h is None or h in committed for h in self.heads.values())
        assert all(p in committed for r in committed.values() for p in r.parents)
        assert {t: self.reg.resolve(t).id for t in self.tags} == self.tags
        for cid in self.parents:
            self._check_lineage(cid)
        for branch, head in self.heads.items():
            chain = []
            while head is not None:
                chain.append(head)
                head = self.parents[head][0] if self.parents[head] else None
            assert [r.id for r in self.reg.log(branch)] == chain

    def _check_lineage(self, cid: str) -> None:
        up = distances(cid, self.parents)
        children: dict[str, tuple[str, ...]] = {}
        for child, ps in self.parents.items():
            for p in ps:
                children[p] = (*children.get(p, ()), child)
        down = distances(cid, children)
        ancestors = [r.id for r in self.reg.ancestors(cid)]
        descendants = [r.id for r in self.reg.descendants(cid)]
        assert set(ancestors) == set(up) and len(ancestors) == len(up)
        assert set(descendants) == set(down) and len(descendants) == len(down)
        assert cid not in ancestors and cid not in descendants  # no cycles
        assert [up[a] for a in ancestors] == sorted(up[a] for a in ancestors)
        assert [down[d] for d in descendants] == sorted(down[d] for d in descendants)
        assert {r.id for r in self.reg.children(cid)} == set(children.get(cid, ()))
        for record in [*self.reg.ancestors(cid), *self.reg.descendants(cid)]:
            assert record.parents == self.parents[record.id]
        for depth in (1, 2):
            assert {r.id for r in self.reg.ancestors(cid, depth=depth)} == {
                a for a, d in up.items() if d <= depth
            }
            assert {r.id for r in self.reg.descendants(cid, depth=depth)} == {
                x for x, d in down.items() if d <= depth
            }


def test_random_operations_keep_lineage_invariants(registry: Registry) -> None:
    run_state_machine_as_test(
        lambda: LineageMachine(registry),
        settings=settings(
            max_examples=15,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    # The whole database, every example together: heads, tags and edges join committed rows.
    everything = registry.checkpoints()
    committed = {c.id for c in everything}
    assert len(committed) == len(everything)
    assert all(b.head is None or b.head in committed for b in registry.branches())
    assert all(b.base is None or b.base in committed for b in registry.branches())
    assert all(t.checkpoint in committed for t in registry.tags())
    assert all(p in committed for c in everything for p in c.parents)
