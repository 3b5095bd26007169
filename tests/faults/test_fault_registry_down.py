"""The registry database goes away at commit time: nothing becomes visible, training goes on.

PostgreSQL is reached through a TCP relay that the test cuts the moment a save's manifest is
durable, i.e. just before its registry commit: the database is gone for the client exactly as
if its server had stopped (refused connections, reset sockets). The shared server itself keeps
running for everyone else.
"""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

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

pytestmark = pytest.mark.postgres


class CutAtCommit(LocalStore):
    """A local store that cuts the relay once the ``cut_after``-th manifest is written."""

    def __init__(self, root: Path, proxy: TcpProxy) -> None:
        super().__init__(root)
        self.proxy = proxy
        self.cut_after: int | None = None
        self.manifests = 0

    def put(self, key: str, data: Any) -> None:
        super().put(key, data)
        if key.startswith("manifests/"):
            self.manifests += 1
            if self.manifests == self.cut_after:
                self.proxy.stop()


@pytest.mark.parametrize("registry_url", ["postgres"], indirect=True)
def test_database_stopped_at_commit_leaves_nothing_visible_and_training_continues(
    registry: Registry, registry_url: str, tmp_path: Path
) -> None:
    proxy = TcpProxy(5432).start()
    through_proxy = registry_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    assert through_proxy != registry_url
    registry.create_branch("main")
    store = CutAtCommit(tmp_path / "store", proxy)
    model = nn.Linear(64, 64)
    tally: Counter[str] = Counter()
    committed: list[tuple[int, str]] = []
    with Registry(through_proxy) as proxied:
        ckpt = Checkpointer("main", registry=proxied, store=store)
        step = 0
        for _ in range(OUTAGES):
            step += 1
            committed.append((step, ckpt.save(step, model=model).result()))
            visible = registry.log("main")
            # the next save's commit meets a stopped database
            store.cut_after = store.manifests + 1
            step += 1
            with torch.no_grad():
                model.weight.add_(1.0)  # training goes on: the state changes
            failed = ckpt.save(step, model=model)
            with pytest.raises(RegistryUnavailable) as info:
                failed.result()
            message = str(info.value)
            assert message.count("\n") == 0 and "unreachable" in message, message
            assert f"127.0.0.1:{proxy.port}" in message and "check that its server" in message
            tally["commits refused by a stopped database"] += 1
            assert registry.log("main") == visible  # nothing visible
            step += 1
            with torch.no_grad():
                model.weight.add_(1.0)
            still_down = ckpt.save(step, model=model)  # the loop is not blocked, only told
            with pytest.raises(RegistryUnavailable):
                still_down.result()
            proxy.start()
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
    proxy.stop()
    COUNTS.update({f"database stopped at commit: {k}": v for k, v in tally.items()})
