"""The facade's contract: a save's own manifest, bounded memory, failures after the commit."""

from __future__ import annotations

import pytest
import torch

from tlreg.ckpt.checkpointer import MANIFEST_CACHE
from tlreg.ckpt.manifest import manifest_key, read_manifest


def test_pending_save_gives_the_manifest_it_wrote_without_reading_the_store(
    ckpt, model_factory, monkeypatch
):
    pending = ckpt.save({"model": model_factory().state_dict()}, step=7)
    pending.result()
    reads: list[str] = []
    original_get = type(ckpt.store).get
    monkeypatch.setattr(
        type(ckpt.store), "get", lambda self, key: (reads.append(key), original_get(self, key))[1]
    )
    manifest = pending.manifest()
    assert reads == []
    assert manifest.id == pending.result() and manifest.step == 7
    assert manifest.to_bytes() == read_manifest(ckpt.store, manifest.id).to_bytes()
    assert pending.manifest(timeout=1) is manifest
    assert reads == [manifest_key(manifest.id)]  # only the explicit read above


def test_the_facade_keeps_a_bounded_number_of_manifests_and_dedup_entries(ckpt):
    first = ckpt.save({"w": torch.zeros(16)}).result()
    for step in range(3 * MANIFEST_CACHE):
        ckpt.save({"w": torch.full((16,), float(step + 1))}, step=step).result()
    assert len(ckpt._manifests) <= MANIFEST_CACHE
    assert len(ckpt._index) <= ckpt._index.KEEP_COMMITS
    assert ckpt.manifest(first).tensors["w"].nbytes == 64  # an old one is read again


def test_a_failure_after_the_manifest_fails_the_save_instead_of_hanging_it(
    ckpt, model_factory, monkeypatch
):
    from tlreg.ckpt.persist import DedupIndex

    def broken(self, manifest, part):
        raise RuntimeError("index update failed")

    monkeypatch.setattr(DedupIndex, "committed", broken)
    pending = ckpt.save({"model": model_factory().state_dict()}, step=1)
    with pytest.raises(RuntimeError, match="index update failed"):
        pending.result(timeout=30)
