"""A local store's direct I/O: large puts bypass the page cache, bytes stay exact."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlreg.ckpt.staging import PAGE, PAGE_ALIGN_BYTES, Stager, place
from tlreg.storage_backends import LocalStore, StoreError
from tlreg.storage_backends.local import BLOCK, DIRECT_MIN_BYTES


def _cached_pages(path: Path) -> int:
    """Pages of ``path`` held in the page cache (mincore(2) over a mapping of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # never written
        anchor = ctypes.c_char.from_buffer(mapped)
        try:
            if libc.mincore(ctypes.addressof(anchor), size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del anchor
            mapped.close()
    return sum(v & 1 for v in vector)


def _aligned(nbytes: int) -> memoryview:
    """A writable, page-aligned buffer of ``nbytes`` random bytes."""
    buffer = mmap.mmap(-1, max(nbytes, 1))
    buffer.write(os.urandom(nbytes))
    return memoryview(buffer)[:nbytes]


def _direct_filesystem(path: Path) -> bool:
    probe = path / ".probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    if not _direct_filesystem(tmp_path):
        pytest.skip(f"{tmp_path} has no O_DIRECT")
    return tmp_path


@pytest.mark.parametrize("direct", [True, False])
def test_a_direct_put_leaves_nothing_in_the_page_cache_a_buffered_one_does(
    direct_dir: Path, direct: bool
) -> None:
    store = LocalStore(direct_dir / "s", durability="file", direct_io=direct)
    data = _aligned(8 << 20 | 123)  # 2,048 whole pages, then a partial one
    store.put("objects/ab/big", data)
    path = Path(store.local_path("objects/ab/big") or "")
    cached = _cached_pages(path)
    if direct:
        assert cached <= 1  # at most the last, partial page went through the cache
    else:
        assert cached == 2049
    assert store.get("objects/ab/big") == bytes(data)


part_sizes = st.lists(
    st.one_of(
        st.integers(0, 3 * BLOCK),  # small and unaligned
        st.integers(1, 600).map(lambda k: k * BLOCK),  # whole blocks
        st.integers(BLOCK, 1 << 20),  # large, any length
    ),
    min_size=1,
    max_size=6,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    sizes=part_sizes,
    shifts=st.lists(st.sampled_from([0, 0, 64, 512, 1]), min_size=6, max_size=6),
    readonly=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_direct_puts_of_any_parts_read_back_byte_exact(
    direct_dir: Path, sizes: list[int], shifts: list[int], readonly: list[bool]
) -> None:
    store = LocalStore(direct_dir / "s", durability="none", direct_io=True)
    parts: list[bytes | memoryview] = []
    for size, shift, frozen in zip(sizes, shifts, readonly, strict=False):
        view = _aligned(size + shift)[shift:]  # page-aligned, or misaligned by ``shift``
        parts.append(bytes(view) if frozen else view)
    # pad to the direct-I/O threshold so every example takes the direct path
    total = sum(len(p) for p in parts)
    parts.append(os.urandom(max(0, DIRECT_MIN_BYTES - total) + sizes[0] % 7))
    store.put("objects/cd/x", parts)
    assert store.get("objects/cd/x") == b"".join(bytes(p) for p in parts)


def test_direct_io_falls_back_to_the_page_cache_where_the_filesystem_refuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What open(2) answers on a filesystem without O_DIRECT (tmpfs before Linux 6.6, some
    # FUSE mounts): EINVAL. This kernel's filesystems all accept it, so it is injected.
    real_open = os.open
    refused: list[str] = []

    def no_direct(path: str | os.PathLike[str], flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            refused.append(os.fspath(path))
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    store = LocalStore(tmp_path / "s", direct_io=True)
    monkeypatch.setattr(os, "open", no_direct)
    data = os.urandom(DIRECT_MIN_BYTES + 5)
    store.put("objects/ef/y", data)
    store.put("objects/ef/z", data)
    assert store.get("objects/ef/y") == store.get("objects/ef/z") == data
    assert len(refused) == 1  # asked once; the store remembers
    assert store.direct_io is False
    assert sorted(store.list()) == ["objects/ef/y", "objects/ef/z"]  # no temporary file left


def test_direct_io_comes_from_the_environment_and_survives_pickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLREG_DIRECT_IO", "0")
    store = LocalStore(tmp_path)
    assert store.direct_io is False
    assert pickle.loads(pickle.dumps(store)).direct_io is False
    monkeypatch.delenv("TLREG_DIRECT_IO")
    assert LocalStore(tmp_path).direct_io is True
    assert LocalStore(tmp_path, direct_io=False).direct_io is False


def test_a_malformed_direct_io_setting_is_refused_naming_the_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TLREG_DIRECT_IO", "fast")
    with pytest.raises(StoreError, match=r"TLREG_DIRECT_IO='fast'.*use 1 \(on\) or 0 \(off\)"):
        LocalStore(tmp_path)


def test_arenas_and_their_large_tensors_start_on_a_page() -> None:
    stager = Stager(threads=1)
    try:
        arena = stager.acquire(5 << 20, pinned=False)
        assert arena.data_ptr() % PAGE == 0
        assert arena.numel() >= 5 << 20
        tensors = [torch.zeros(3), torch.zeros(PAGE_ALIGN_BYTES // 4 + 1), torch.zeros(5)]
        end = 0
        for t in tensors:
            offset = place(end, t.nbytes)
            assert offset >= end
            assert offset % (PAGE if t.nbytes >= PAGE_ALIGN_BYTES else 64) == 0
            end = offset + t.nbytes
        stager.release(arena)
    finally:
        stager.close()


@pytest.mark.parametrize("direct", [True, False])
def test_a_direct_read_into_an_aligned_buffer_bypasses_the_page_cache(
    direct_dir: Path, direct: bool
) -> None:
    writer = LocalStore(direct_dir / "s", direct_io=True)
    data = _aligned(4 << 20 | 777)
    writer.put("objects/ab/r", data)
    path = Path(writer.local_path("objects/ab/r") or "")
    with open(path, "rb") as f:  # what the put left in the page cache, if anything
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    reader = LocalStore(direct_dir / "s", direct_io=direct)
    out = _aligned(data.nbytes)
    reader.get_into("objects/ab/r", out)
    assert bytes(out) == bytes(data)
    cached = _cached_pages(path)
    assert cached <= 2 if direct else cached >= 1024  # direct: at most the partial tail


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    start=st.sampled_from([0, BLOCK, 3 * BLOCK, 1, 100]),
    length=st.integers(DIRECT_MIN_BYTES - 3, DIRECT_MIN_BYTES + 3 * BLOCK),
    shift=st.sampled_from([0, 64]),
)
def test_direct_reads_of_any_range_are_byte_exact(
    direct_dir: Path, start: int, length: int, shift: int
) -> None:
    store = LocalStore(direct_dir / "s", durability="none", direct_io=True)
    data = os.urandom(DIRECT_MIN_BYTES + 5 * BLOCK + 11)
    store.put("objects/cd/r", data)
    length = min(length, len(data) - start)
    out = _aligned(length + shift)[shift:]
    store.get_into("objects/cd/r", out, start)
    assert bytes(out) == data[start : start + length]
    with pytest.raises(EOFError, match="shorter than expected"):
        store.get_into("objects/cd/r", _aligned(len(data) + 1), 0)


def test_a_read_of_a_cached_range_copies_it_and_of_an_uncached_one_bypasses_the_cache(
    direct_dir: Path,
) -> None:
    data = _aligned(8 << 20 | 999)
    LocalStore(direct_dir / "s", direct_io=False).put("objects/ab/half", data)  # all cached
    reader = LocalStore(direct_dir / "s", direct_io=True)
    path = Path(reader.local_path("objects/ab/half") or "")
    half = 4 << 20
    with open(path, "rb") as f:  # the second half leaves the cache
        os.posix_fadvise(f.fileno(), half, 0, os.POSIX_FADV_DONTNEED)
    cached = half // mmap.PAGESIZE
    assert _cached_pages(path) == cached
    first, second = _aligned(half), _aligned(data.nbytes - half)
    reader.get_into("objects/ab/half", first, 0)  # cached: copied from the page cache
    reader.get_into("objects/ab/half", second, half)  # not cached: straight off the disk
    assert bytes(first) + bytes(second) == bytes(data)
    assert cached <= _cached_pages(path) <= cached + 1  # (the partial last page, buffered)
    whole = _aligned(data.nbytes)  # partly cached: direct for all of it, exact either way
    reader.get_into("objects/ab/half", whole)
    assert bytes(whole) == bytes(data)
