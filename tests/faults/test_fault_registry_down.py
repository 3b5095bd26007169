"""The registry database goes away at commit time: nothing becomes visible, training goes on.

The outage starts the moment a save's manifest is durable, i.e. just before its registry
commit. PostgreSQL is reached through a TCP relay that is cut: the database is gone for the
client exactly as if its server had stopped (refused connections, reset sockets), while the
shared server keeps running for everyone else. A SQLite registry is write-locked by another
process past the busy timeout.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from faultlib import COUNTS, TcpProxy, trials
from torch import nn

from tlreg.ckpt.manifest import stored_manifests
from tlreg.ckpt.objects import stored_objects
from tlreg.registry import Registry, RegistryUnavailable
from tlreg.storage_backends import LocalStore
from tlreg.training import Checkpointer
from tlreg.training.gc import collect_garbage

OUTAGES = trials(short=2, long=20)


class Outage(Protocol):
    """Makes the registry database unavailable to the client under test, then restores it."""

    url: str
    """The registry URL the client under test uses."""
    expected: str
    """What the one-line error must say."""

    def begin(self) -> None: ...
    def end(self) -> None: ...


class StoppedServer:
    """PostgreSQL behind a relay that is cut: connections refused, open ones reset."""

    expected = "unreachable"

    def __init__(self, registry_url: str) -> None:
        self.proxy = TcpProxy(5432).start()
        self.url = registry_url.replace("127.0.0.1:5432", f"127.0.0.1:{self.proxy.port}")
        assert self.url != registry_url

    def begin(self) -> None:
        self.proxy.stop()

    def end(self) -> None:
        self.proxy.start()


class LockedFile:
    """A SQLite registry that another process keeps write-locked past the busy timeout
    (``?timeout=1``: one second instead of the default 60)."""

    expected = "locked"

    def __init__(self, registry_url: str) -> None:
        self.path = registry_url.removeprefix("sqlite:///")
        self.url = f"{registry_url}?timeout=1"
        self.holder: sqlite3.Connection | None = None

    def begin(self) -> None:
        self.holder = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.holder.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        assert self.holder is not None
        self.holder.execute("ROLLBACK")
        self.holder.close()


class FailAtCommit(LocalStore):
    """A local store that starts the outage once the ``fail_after``-th manifest is written:
    the save's objects and manifest are durable, its registry commit comes next."""

    def __init__(self, root: Path, outage: Outage) -> None:
        super().__init__(root)
        self.outage = outage
        self.fail_after: int | None = None
        self.manifests = 0

    def put(self, key: str, data: Any) -> None:
        super().put(key, data)
        if key.startswith("manifests/"):
            self.manifests += 1
            if self.manifests == self.fail_after:
                self.outage.begin()


def test_database_unavailable_at_commit_leaves_nothing_visible_and_training_continues(
    registry: Registry, registry_url: str, tmp_path: Path
) -> None:
    outage: Outage = (
        LockedFile(registry_url)
        if registry_url.startswith("sqlite")
        else StoppedServer(registry_url)
    )
    registry.create_branch("main")
    store = FailAtCommit(tmp_path / "store", outage)
    model = nn.Linear(64, 64)
    tally: Counter[str] = Counter()
    committed: list[tuple[int, str]] = []
    with Registry(outage.url) as proxied:
        ckpt = Checkpointer("main", registry=proxied, store=store)
        step = 0
        for _ in range(OUTAGES):
            step += 1
            committed.append((step, ckpt.save(step, model=model).result()))
            visible = registry.log("main")
            # the next save's commit meets an unavailable database
            store.fail_after = store.manifests + 1
            step += 1
            with torch.no_grad():
                model.weight.add_(1.0)  # training goes on: the state changes
            failed = ckpt.save(step, model=model)
            with pytest.raises(RegistryUnavailable) as info:
                failed.result()
            message = str(info.value)
            assert message.count("\n") == 0 and outage.expected in message, message
            assert "registry database" in message
            tally["commits refused by an unavailable database"] += 1
            assert registry.log("main") == visible  # nothing visible
            step += 1
            with torch.no_grad():
                model.weight.add_(1.0)
            still_down = ckpt.save(step, model=model)  # the loop is not blocked, only told
            with pytest.raises(RegistryUnavailable):
                still_down.result()
            outage.end()
            step += 1
            committed.append((step, ckpt.save(step, model=model).result()))
            tally["saves after the database came back"] += 1
        ckpt.close()

    log = registry.log("main")
    assert [(r.step, r.id) for r in reversed(log)] == committed
    assert all(r.parents == (p.id,) for r, p in itertools.pairwise(log))
    orphans = stored_manifests(store) - {r.manifest for r in log}
    assert len(orphans) == 2 * OUTAGES
    collect_garbage(registry, store, grace=timedelta(0))
    assert stored_manifests(store) == {r.manifest for r in log}
    assert stored_objects(store) == {h for r in log for h in registry.objects_of(r.id)}
    tally["orphaned manifests collected"] += len(orphans)
    COUNTS.update({f"database unavailable at commit: {k}": v for k, v in tally.items()})
