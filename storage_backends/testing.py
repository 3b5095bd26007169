"""The store conformance suite, shipped so that every backend (and third-party ones) is
tested the same way.

A backend's test module subclasses :class:`StoreTests` and provides two pytest fixtures:

- ``store``: a fresh, empty store;
- ``oracle``: an object with ``read(key) -> bytes | None`` and ``write(key, data)`` that
  reaches the same objects *behind the store's back* (the directory itself, a second S3
  client, the backing dict), so the suite checks what was really stored, not only that the
  store agrees with itself.

Needs pytest and hypothesis, which are test dependencies only.
"""

from __future__ import annotations

import array
import os
import threading
import time
import uuid
from pathlib import Path
from typing import ClassVar, Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlreg.storage_backends.base import Buffer, Store
from tlreg.storage_backends.errors import InvalidKey, ObjectNotFound

__all__ = ["DirectoryOracle", "Oracle", "StoreTests"]


class Oracle(Protocol):
    """Reads and writes a store's objects without going through the store."""

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Create or replace the object."""
        ...


class DirectoryOracle:
    """The oracle of stores that keep each object as a file under ``root``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def read(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def write(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


_segment = st.text(alphabet="abcxyz0189-_.", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
_key = st.lists(_segment, min_size=1, max_size=3).map("/".join)


def _no_file_folder_clash(keys: set[str]) -> bool:
    # 'a' and 'a/b' cannot both exist on a filesystem, so the suite never asks for it
    return not any(other.startswith(k + "/") for k in keys for other in keys)


class StoreTests:
    """Behaviour every :class:`Store` must have. Subclass it and provide ``store``/``oracle``."""

    #: size of the "multi-MiB" objects; S3 subclasses pick one above their part size
    large_size: ClassVar[int] = 3 * 2**20 + 17
    #: whether an unpickled store reaches the same objects (not for stores that copy)
    pickle_shares_data: ClassVar[bool] = True
    #: examples of the property-based round trip
    hypothesis_examples: ClassVar[int] = 25

    # -- put / get ------------------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 1000, "large"])
    def test_put_get_round_trip(self, store: Store, oracle: Oracle, size: int | str) -> None:
        data = os.urandom(self.large_size if size == "large" else int(size))
        store.put("objects/ab/blob", data)
        assert store.get("objects/ab/blob") == data
        assert oracle.read("objects/ab/blob") == data
        assert store.size("objects/ab/blob") == len(data)

    def test_get_reads_objects_written_behind_its_back(self, store: Store, oracle: Oracle) -> None:
        oracle.write("x/y", b"written elsewhere")
        assert store.exists("x/y")
        assert store.get("x/y") == b"written elsewhere"
        assert sorted(store.list()) == ["x/y"]

    def test_put_of_buffer_list_equals_concatenation(self, store: Store, oracle: Oracle) -> None:
        big = self.large_size // 3 + 7
        parts: list[Buffer] = [
            os.urandom(big),
            b"",
            bytearray(os.urandom(1000)),
            memoryview(os.urandom(big + 500))[250:-250],
            memoryview(array.array("d", [1.5, -2.0, 3.25])),  # a non-byte format is cast
            os.urandom(big),
        ]
        expected = b"".join(bytes(memoryview(p).cast("B")) for p in parts)
        store.put("packed", parts)
        assert oracle.read("packed") == expected
        assert store.get("packed") == expected
        store.put("small-packed", [b"ab", b"", b"cd"])
        assert oracle.read("small-packed") == b"abcd"

    def test_put_of_empty_buffer_list_is_an_empty_object(self, store: Store) -> None:
        store.put("none", [])
        assert store.get("none") == b""

    # -- ranges ---------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("start", "length", "expected"),
        [(0, 10, (0, 10)), (90, 10, (90, 100)), (95, 10, (95, 100)), (100, 5, (100, 100)),
         (150, 5, (150, 150)), (7, 0, (7, 7))],
    )  # fmt: skip
    def test_get_range_stops_at_the_end(
        self, store: Store, start: int, length: int, expected: tuple[int, int]
    ) -> None:
        data = os.urandom(100)
        store.put("r", data)
        assert store.get_range("r", start, length) == data[expected[0] : expected[1]]

    def test_get_range_of_large_object_spans_parts(self, store: Store) -> None:
        data = os.urandom(self.large_size)
        store.put("big", data)
        for start, length in [(0, 1), (self.large_size // 2 - 3, 2**20 + 11), (5 * 2**20 - 1, 2)]:
            assert store.get_range("big", start, length) == data[start : start + length]

    def test_get_into_fills_the_buffer(self, store: Store) -> None:
        data = os.urandom(4000)
        store.put("into", data)
        out = bytearray(1000)
        store.get_into("into", memoryview(out), start=3000)
        assert out == data[3000:]
        whole = array.array("i", bytes(4000))  # an int buffer is filled byte for byte
        store.get_into("into", memoryview(whole))
        assert whole.tobytes() == data

    def test_get_into_past_the_end_raises_eof(self, store: Store) -> None:
        store.put("short", b"abc")
        with pytest.raises(EOFError):
            store.get_into("short", memoryview(bytearray(4)))

    # -- exists / size / folders ----------------------------------------------------------

    def test_exists_and_size(self, store: Store) -> None:
        assert not store.exists("a/b")
        store.put("a/b", b"12345")
        assert store.exists("a/b")
        assert store.size("a/b") == 5

    def test_folder_is_not_an_object(self, store: Store) -> None:
        store.put("dir/sub/leaf", b"1")
        for folder in ("dir", "dir/sub"):
            assert not store.exists(folder)
            with pytest.raises(ObjectNotFound):
                store.get(folder)
            with pytest.raises(ObjectNotFound):
                store.size(folder)

    # -- list -----------------------------------------------------------------------------

    def test_list_of_empty_store_is_empty(self, store: Store) -> None:
        assert list(store.list()) == []
        assert list(store.list("nothing/here")) == []

    def test_list_under_prefixes(self, store: Store) -> None:
        keys = ["a/b", "a/c/d", "a/c/e", "ab/c", "top", "x/y/z"]
        for k in keys:
            store.put(k, k.encode())
        assert sorted(store.list()) == keys
        assert sorted(store.list("a")) == ["a/b", "a/c/d", "a/c/e"]
        assert sorted(store.list("a/")) == ["a/b", "a/c/d", "a/c/e"]
        assert sorted(store.list("a/c")) == ["a/c/d", "a/c/e"]
        assert sorted(store.list("ab")) == ["ab/c"]  # shares the string 'a', not the folder
        assert sorted(store.list("x/y")) == ["x/y/z"]
        assert list(store.list("a/b")) == []  # a key is not a folder
        assert list(store.list("missing")) == []

    def test_list_sees_many_keys(self, store: Store) -> None:
        keys = sorted(f"many/{i:04d}" for i in range(120))
        for k in keys:
            store.put(k, b"")
        assert sorted(store.list("many")) == keys

    # -- delete / overwrite ---------------------------------------------------------------

    def test_delete_removes_the_object(self, store: Store, oracle: Oracle) -> None:
        store.put("d/e/f", b"x")
        store.put("d/keep", b"y")
        store.delete("d/e/f")
        assert not store.exists("d/e/f")
        assert oracle.read("d/e/f") is None
        assert sorted(store.list()) == ["d/keep"]
        with pytest.raises(ObjectNotFound):
            store.get("d/e/f")

    def test_delete_of_missing_key_is_fine(self, store: Store) -> None:
        store.delete("never/written")
        store.put("once", b"1")
        store.delete("once")
        store.delete("once")

    def test_overwrite_is_atomic_from_the_oracles_view(self, store: Store, oracle: Oracle) -> None:
        versions = [os.urandom(2**20), os.urandom(2**20 + 4096)]
        store.put("hot", versions[0])
        done = threading.Event()
        seen: list[bytes | None] = []

        def read_until_done() -> None:
            while not done.is_set():
                seen.append(oracle.read("hot"))
                time.sleep(0)  # let the writer have the GIL between reads

        reader = threading.Thread(target=read_until_done)
        reader.start()
        try:
            for i in range(8):
                store.put("hot", versions[(i + 1) % 2])
        finally:
            done.set()
            reader.join()
        assert seen
        assert all(s in versions for s in seen), "a reader saw a partial or missing object"
        assert store.get("hot") == versions[0]

    # -- errors ---------------------------------------------------------------------------

    def test_missing_key_raises_object_not_found(self, store: Store) -> None:
        store.put("present", b"1")
        calls = [
            lambda: store.get("absent/key"),
            lambda: store.get_range("absent/key", 0, 10),
            lambda: store.get_range("absent/key", 0, 0),
            lambda: store.size("absent/key"),
            lambda: store.get_into("absent/key", memoryview(bytearray(1))),
            lambda: store.get_json("absent/key"),
        ]
        for call in calls:
            with pytest.raises(ObjectNotFound, match="absent/key") as info:
                call()
            assert isinstance(info.value, FileNotFoundError)

    @pytest.mark.parametrize(
        "key", ["", "/abs", "trailing/", "a//b", "a/./b", "./a", ".", "..", "../up", "a/../b",
                "tab\there", "nul\x00"],
    )  # fmt: skip
    def test_invalid_keys_raise(self, store: Store, key: str) -> None:
        for call in (
            lambda: store.put(key, b"1"),
            lambda: store.get(key),
            lambda: store.get_range(key, 0, 1),
            lambda: store.exists(key),
            lambda: store.size(key),
            lambda: store.delete(key),
        ):
            with pytest.raises(InvalidKey):
                call()
        assert list(store.list()) == []

    @pytest.mark.parametrize(
        "prefix", ["/abs", "a//b", "a/./b", "./a", ".", "..", "../up", "a/../b", "..//",
                   "tab\there"],
    )  # fmt: skip
    def test_invalid_list_prefixes_raise_and_never_leave_the_store(
        self, store: Store, prefix: str
    ) -> None:
        store.put("a/b", b"1")
        with pytest.raises(InvalidKey, match="invalid store prefix"):
            list(store.list(prefix))

    # -- derived operations ---------------------------------------------------------------

    def test_put_if_absent_is_idempotent(self, store: Store, oracle: Oracle) -> None:
        assert store.put_if_absent("cas/h", b"first") is True
        assert store.put_if_absent("cas/h", b"second") is False
        assert oracle.read("cas/h") == b"first"

    def test_json_round_trip_is_canonical(self, store: Store, oracle: Oracle) -> None:
        store.put_json("m/1.json", {"b": [1, 2.5, None], "a": {"z": "é", "y": True}})
        store.put_json("m/2.json", {"a": {"y": True, "z": "é"}, "b": [1, 2.5, None]})
        assert store.get_json("m/1.json") == {"a": {"y": True, "z": "é"}, "b": [1, 2.5, None]}
        assert oracle.read("m/1.json") == oracle.read("m/2.json")

    # -- threads (pickling: tests/storage/store_pickling.py, outside the package) ----------

    def test_concurrent_puts_from_threads_all_land(self, store: Store, oracle: Oracle) -> None:
        errors: list[BaseException] = []

        def write(t: int) -> None:
            try:
                for i in range(4):
                    store.put(f"t/{t}/{i}", f"{t}-{i}".encode() * (100 * t + 1))
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert not errors
        expected = {f"t/{t}/{i}": f"{t}-{i}".encode() * (100 * t + 1) for t in range(8)
                    for i in range(4)}  # fmt: skip
        assert sorted(store.list("t")) == sorted(expected)
        for k, v in expected.items():
            assert oracle.read(k) == v

    # -- property ---------------------------------------------------------------------------

    def test_random_objects_round_trip_against_the_oracle(
        self, store: Store, oracle: Oracle
    ) -> None:
        @settings(
            max_examples=self.hypothesis_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(
            objects=st.dictionaries(_key, st.binary(max_size=2048), min_size=1, max_size=8)
            .filter(lambda d: _no_file_folder_clash(set(d)))
        )  # fmt: skip
        def round_trip(objects: dict[str, bytes]) -> None:
            base = f"h{uuid.uuid4().hex[:8]}"  # the store is shared by every example
            for k, v in objects.items():
                store.put(f"{base}/{k}", v)
            for k, v in objects.items():
                assert oracle.read(f"{base}/{k}") == v
                assert store.get(f"{base}/{k}") == v
                assert store.size(f"{base}/{k}") == len(v)
            assert sorted(store.list(base)) == sorted(f"{base}/{k}" for k in objects)

        round_trip()
