"""Properties of repacking (hypothesis): whatever objects and live spans, after a repack every
live span is found through the relocation records with exactly its bytes, the record file
round-trips, and live bytes count every byte once."""

from __future__ import annotations

import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from tlreg.ckpt.hashing import hash_bytes
from tlreg.ckpt.objects import (
    MovedRange,
    Relocation,
    delete_object,
    locate,
    read_relocation,
    write_marker,
    write_unless_stored,
)
from tlreg.ckpt.repack import live_bytes, repack
from tlreg.storage_backends import open_store

EXAMPLES = 200 if os.environ.get("TLREG_STRESS", "") not in ("", "0") else 25


@st.composite
def objects_with_spans(draw: st.DrawFn) -> list[tuple[bytes, list[tuple[int, int]]]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        data = draw(st.binary(min_size=1, max_size=3000))
        cuts = sorted(set(draw(st.lists(st.integers(0, len(data)), max_size=8))) | {0, len(data)})
        pieces = list(itertools.pairwise(cuts))
        live = [p for p in pieces if p[1] > p[0] and draw(st.booleans())]
        if not live:
            live = [pieces[0]]
        out.append((data, live))
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(objects_with_spans(), st.integers(64, 4096))
def test_every_live_span_reads_back_through_the_records(
    objects: list[tuple[bytes, list[tuple[int, int]]]], pack_bytes: int
) -> None:
    store = open_store("memory://")
    chosen = {}
    expected = {}
    for data, live in objects:
        digest = hash_bytes(data)
        layout = write_unless_stored(store, digest, [memoryview(data)], len(data))
        if layout is not None:
            write_marker(store, digest, layout)
        spans = {(lo, hi - lo, hash_bytes(data[lo:hi])) for lo, hi in live}
        chosen[digest] = (len(data), spans | chosen.get(digest, (0, set()))[1])
        for lo, hi in live:
            expected[(digest, lo, hi - lo)] = data[lo:hi]
    done, skipped = repack(store, chosen, pack_bytes=pack_bytes)
    # an object whose every byte is live is left alone (nothing to free)
    worth = {d for d, (n, spans) in chosen.items() if live_bytes(spans) < n}
    assert not skipped and {r.object for r in done} == worth
    for r in done:
        assert r.live == live_bytes(chosen[r.object][1])
        delete_object(store, r.object)
    for (digest, offset, nbytes), want in expected.items():
        found = locate(store, digest, offset, nbytes)
        assert found is not None
        target, at = found
        assert (target == digest) == (digest not in worth)
        assert _read(store, target, at, nbytes) == want


def _read(store, digest: str, offset: int, nbytes: int) -> bytes:  # type: ignore[no-untyped-def]
    from tlreg.ckpt.objects import ObjectReader

    out = memoryview(bytearray(nbytes))
    ObjectReader(store, "test").read_into(digest, offset, out, "span")
    return bytes(out)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**9), st.integers(1, 10**6), st.integers(0, 10**9)),
        max_size=6,
    ),
    st.integers(1, 10**10),
)
def test_a_relocation_record_round_trips(ranges: list[tuple[int, int, int]], nbytes: int) -> None:
    store = open_store("memory://")
    digest = hash_bytes(b"old")
    target = hash_bytes(b"new")
    record = Relocation(digest, nbytes, tuple(MovedRange(o, n, target, t) for o, n, t in ranges))
    store.put(f"relocations/{digest[:2]}/{digest[2:4]}/{digest}.json", record.to_bytes())
    assert read_relocation(store, digest) == record


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 100)), max_size=20))
def test_live_bytes_counts_every_byte_once(spans: list[tuple[int, int]]) -> None:
    covered = set()
    for offset, nbytes in spans:
        covered.update(range(offset, offset + nbytes))
    assert live_bytes({(o, n, "h") for o, n in spans}) == len(covered)
