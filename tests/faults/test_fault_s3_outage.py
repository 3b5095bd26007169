"""The S3 server goes away in the middle of a save: the save fails cleanly, training goes on.

The store reaches the real S3 server through a TCP relay that is cut after the save's first
object is written (connections refused, open ones reset: what a stopped server gives a
client). The save must fail after the store's retries with one clear line from
``PendingSave.result()``, the registry must not change, the training loop must not block,
and once the relay is back the next save must succeed — and verify, so nothing that the
failed save never wrote is referenced.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
import torch
from faultlib import COUNTS, TcpProxy, trials
from torch import nn

from tlreg.ckpt import verify
from tlreg.ckpt.manifest import stored_manifests
from tlreg.ckpt.objects import stored_objects
from tlreg.registry import Registry
from tlreg.storage_backends import StoreError
from tlreg.storage_backends.s3 import S3Store
from tlreg.training import Checkpointer
from tlreg.training.gc import collect_garbage

OUTAGES = trials(short=1, long=5)

pytestmark = [pytest.mark.s3, pytest.mark.slow]


class CutMidSave(S3Store):
    """An S3 store that cuts the relay after the ``cut_after``-th chunk put."""

    def __init__(self, url: str, proxy: TcpProxy) -> None:
        # 3 attempts per request (backoff waits of up to 1 + 2 s): each of the save's
        # remaining puts gives up within seconds, not the default 5 attempts' ~15 s
        super().__init__(url, max_attempts=3)
        self.proxy = proxy
        self.cut_after: int | None = None
        self.chunks = 0

    def put(self, key: str, data: Any) -> None:
        super().put(key, data)
        if "/c/" in key:
            self.chunks += 1
            if self.chunks == self.cut_after:
                self.proxy.stop()


class Model(nn.Module):
    """A 17 MiB matrix (an object of its own) and small tensors (packed): several objects."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.randn(17 << 18))
        self.small = nn.Linear(32, 32)


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_s3_server_gone_mid_save_fails_cleanly_and_the_next_save_succeeds(
    registry: Registry,
    s3_server: Any,
    s3_bucket_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1])).start()
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{proxy.port}")
    store = CutMidSave(s3_bucket_url, proxy)
    registry.create_branch("main")
    model = Model()
    tally: Counter[str] = Counter()
    committed: list[str] = []
    with Checkpointer("main", registry=registry, store=store) as ckpt:
        step = 0
        for _ in range(OUTAGES):
            step += 1
            committed.append(ckpt.save(step, model=model).result())
            visible = registry.log("main")
            store.cut_after = store.chunks + 1
            with torch.no_grad():
                model.big.add_(1.0)
                model.small.weight.add_(1.0)
            step += 1
            failed = ckpt.save(step, model=model)
            failed.staged.result()  # the loop gets its state back at once...
            for _ in range(3):  # ...and keeps training while the write struggles
                with torch.no_grad():
                    model.small.bias.add_(1.0)
            with pytest.raises(StoreError) as info:
                failed.result()
            message = str(info.value)
            assert "\n" not in message and (
                f"127.0.0.1:{proxy.port}" in message or s3_bucket_url.split("/")[2] in message
            ), message
            assert s3_server.secret_key not in message
            assert registry.log("main") == visible
            tally["saves failed by a vanished S3 server"] += 1
            proxy.start()
            step += 1
            committed.append(ckpt.save(step, model=model).result())
            tally["saves after the server came back"] += 1

    log = registry.log("main")
    assert [r.id for r in reversed(log)] == committed
    for record in log:
        assert verify(store, record.manifest).ok
    referenced = {h for r in log for h in registry.objects_of(r.id)}
    collect_garbage(registry, store, grace=timedelta(0))
    assert stored_objects(store) == referenced
    assert stored_manifests(store) == {r.manifest for r in log}
    for record in log:
        assert verify(store, record.manifest).ok
    proxy.stop()
    COUNTS.update({f"S3 server gone mid-save: {k}": v for k, v in tally.items()})
