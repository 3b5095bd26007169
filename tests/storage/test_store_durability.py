"""A local store's durability policy decides which fsyncs a put makes, nothing else."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from tlreg.storage_backends import LocalStore, StoreError


@pytest.mark.parametrize(
    "durability, fsyncs", [("full", ["file", "dir"]), ("file", ["file"]), ("none", [])]
)
def test_each_policy_makes_exactly_its_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str, fsyncs: list[str]
) -> None:
    store = LocalStore(tmp_path / "s", durability=durability)
    store.put("objects/ab/x", b"warm")  # creates the folders
    seen: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        seen.append("dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.put("objects/ab/y", [b"pay", b"load"])
    assert seen == fsyncs
    assert store.get("objects/ab/y") == b"payload"
    assert store.supports_fsync == (durability != "none")


def test_the_policy_comes_from_the_environment_and_survives_pickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLREG_DURABILITY", "file")
    store = LocalStore(tmp_path)
    assert store.durability == "file"
    monkeypatch.delenv("TLREG_DURABILITY")
    assert LocalStore(tmp_path).durability == "full"
    assert pickle.loads(pickle.dumps(store)).durability == "file"


def test_an_unknown_policy_is_refused_naming_the_choices(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"unknown durability 'fast'.*full, file, none"):
        LocalStore(tmp_path, durability="fast")
