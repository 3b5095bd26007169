"""Remains of interrupted puts: swept once older than the cut-off, never a live object."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tlreg.storage_backends import LocalStore, MemoryStore
from tlreg.storage_backends.fsspec_store import FsspecStore


def _abandon(store: LocalStore, key: str, age: timedelta) -> Path:
    """What a put SIGKILLed after opening its temporary file leaves behind."""
    target = store.root / key
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-0123456789abcdef"
    tmp.write_bytes(b"half an obj")
    stamp = (datetime.now(timezone.utc) - age).timestamp()
    os.utime(tmp, (stamp, stamp))
    return tmp


@pytest.mark.parametrize("kind", ["local", "fsspec"])
def test_sweep_removes_only_temporaries_older_than_the_cutoff(tmp_path: Path, kind: str) -> None:
    local = LocalStore(tmp_path / "s")
    store = local if kind == "local" else FsspecStore(local.root.as_uri())
    store.put("objects/ab/cd/x", b"whole object")
    old = _abandon(local, "objects/ab/cd/y", timedelta(hours=2))
    young = _abandon(local, "manifests/m.json", timedelta(seconds=5))
    cutoff = datetime.now(timezone.utc) - timedelta(hours=1)

    assert store.sweep_abandoned(cutoff, dry_run=True) == 1
    assert old.exists() and young.exists()
    assert store.sweep_abandoned(cutoff) == 1
    assert not old.exists() and young.exists()
    assert store.get("objects/ab/cd/x") == b"whole object"
    assert sorted(store.list()) == ["objects/ab/cd/x"]
    assert store.sweep_abandoned(datetime.now(timezone.utc) + timedelta(seconds=1)) == 1
    assert not young.exists()


def test_stores_without_remains_sweep_nothing() -> None:
    store = MemoryStore("memory://sweep")
    store.put("a", b"1")
    assert store.sweep_abandoned(datetime.now(timezone.utc) + timedelta(days=1)) == 0
    assert store.get("a") == b"1"
