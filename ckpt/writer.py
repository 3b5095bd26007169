"""The writer process: hashing, packing and object writes outside the training process.

With ``AsyncCheckpointer(..., writer="process")`` the staging arenas live in shared memory
(files in ``/dev/shm``) and one long-lived writer subprocess does the byte work of a save:
BLAKE3 hashing, hashing packs, chunking and object writes. The writer is a fresh interpreter
(spawned, never forked: the parent's threads and CUDA state are not inherited), started on
the first save and stopped by ``close()``; it imports only this module, not torch. It is not
started through ``multiprocessing``'s spawn context, which re-imports the parent's
``__main__`` and so re-runs a training script that lacks the ``__main__`` guard; it gets its
end of a socket pair, the parent's ``sys.path`` and how to rebuild the store (JSON).
Hashing and encoding then never take the training process's GIL. The parent keeps
everything with state — the dedup index, the packing plan, manifests and the commit — and
sends the writer small JSON requests over the socket:

- ``hash``: the BLAKE3 hex digest of each span;
- ``object``: write an object whose digest the parent knows (a solo tensor), unless stored;
- ``pack``: hash the spans as one object, then write it unless stored;
- ``meta``: write the ``zarr.json`` of objects whose chunks are all durable;
- ``forget``: unmap a shared segment the parent dropped.

A span is ``[segment, offset, nbytes]``: bytes of a shared segment, or ``nbytes`` zero bytes
when ``segment`` is null. Every request is answered by one JSON reply with its ``id``, sent
once the work is done (an object's chunks are durable when its reply arrives). Nothing
crosses the pipe but JSON (the store too: its ``__reduce__`` as a JSON recipe); tensors
travel through the shared segments only, and nothing is ever unpickled. The writer exits
when the pipe closes, so it dies with the parent; if it dies first, every request in flight
fails with :class:`WriterError`, and the next request starts a fresh writer.
"""

from __future__ import annotations

import copy
import importlib
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any

from tlreg.ckpt.errors import WriterError
from tlreg.ckpt.hashing import hash_parts
from tlreg.ckpt.objects import ObjectLayout, write_marker, write_unless_stored, zero_pad
from tlreg.storage_backends import MemoryStore, Store

if TYPE_CHECKING:
    import torch

SHM_DIR = "/dev/shm"
"""Where POSIX shared memory segments appear as files (Linux)."""

_ZERO_PAD_MAX = 1 << 16  # zero_pad's limit: longer zero spans are split

Span = tuple[str | None, int, int]
"""``(segment name or None for zeros, offset, nbytes)``."""


def store_recipe(store: Store) -> dict[str, Any]:
    """``store`` as JSON: the import path of the factory its ``__reduce__`` names, the
    arguments and the state. Stores reduce to their configuration (URL, options; never
    credentials), so the writer process can rebuild one without unpickling anything."""
    reduced = store.__reduce__()
    factory, args = reduced[0], reduced[1]
    state = reduced[2] if len(reduced) > 2 else None
    recipe = {
        "factory": f"{factory.__module__}:{factory.__qualname__}",
        "args": list(args),
        "state": state,
    }
    json.dumps(recipe)  # TypeError now, in the parent, for arguments JSON cannot carry
    return recipe


def build_store(recipe: dict[str, Any]) -> Store:
    """The store a :func:`store_recipe` describes."""
    module, _, qualname = recipe["factory"].partition(":")
    factory: Any = importlib.import_module(module)
    for part in qualname.split("."):
        factory = getattr(factory, part)
    store = factory(*recipe["args"])
    if recipe["state"] is not None:
        store.__setstate__(recipe["state"])
    if not isinstance(store, Store):
        raise TypeError(f"{recipe['factory']} built a {type(store).__name__}, not a Store")
    return store


def check_store(store: Store) -> None:
    """Raise ``ValueError`` unless a writer process can reach ``store``."""
    if isinstance(store, MemoryStore):
        raise ValueError(
            f"{store!r} lives in this process's memory, where a writer process cannot write; "
            "use writer='thread' with memory:// stores"
        )
    try:
        # (copy goes through the same __reduce__ as pickle, without serialising anything)
        kind = type(copy.copy(store))
    except Exception as e:
        raise ValueError(
            f"{store!r} cannot be copied to a writer process ({type(e).__name__}: {e}); "
            "use writer='thread'"
        ) from None
    if kind is not type(store):
        raise ValueError(
            f"{store!r} pickles as a {kind.__name__}, so a writer process would not run "
            f"{type(store).__name__}'s own methods; give it a __reduce__ or use writer='thread'"
        )
    if not os.path.isdir(SHM_DIR):
        raise ValueError(
            f"writer='process' needs POSIX shared memory under {SHM_DIR} (Linux); "
            "use writer='thread' on this system"
        )


# -- parent side ---------------------------------------------------------------------------


class SharedArenas:
    """Allocates staging arenas in shared memory, as tensors the writer can map by name.

    Each arena is a ``SharedMemory`` segment (so the resource tracker unlinks it should this
    process die) mapped by torch itself (``torch.from_file``), so the tensor owns its
    mapping and no Python buffer export outlives it. :meth:`drop` unlinks the segment.
    """

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self._lock = threading.Lock()

    def new(self, nbytes: int) -> torch.Tensor:
        import torch  # (not at the top: the writer process never needs it)

        shm = SharedMemory(create=True, size=nbytes)
        try:
            arena = torch.from_file(
                os.path.join(SHM_DIR, shm.name), shared=True, size=nbytes, dtype=torch.uint8
            )
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        shm.close()  # torch holds its own mapping; the segment lives until unlink
        with self._lock:
            self._names[arena.data_ptr()] = shm.name
        return arena

    def name(self, arena: torch.Tensor) -> str:
        """The segment name of an arena from :meth:`new`."""
        with self._lock:
            return self._names[arena.data_ptr()]

    def drop(self, arena: torch.Tensor) -> str | None:
        """Unlink the arena's segment (its memory goes once the tensor is freed)."""
        with self._lock:
            name = self._names.pop(arena.data_ptr(), None)
        if name is not None:
            segment = SharedMemory(name=name)
            segment.close()
            segment.unlink()  # also unregisters it from the resource tracker
        return name

    def drop_all(self) -> list[str]:
        with self._lock:
            names = list(self._names.values())
            self._names.clear()
        for name in names:
            segment = SharedMemory(name=name)
            segment.close()
            segment.unlink()
        return names


class ProcessWriter:
    """The parent's handle on the writer process: JSON requests in, futures out.

    Started on the first request, restarted on the first request after it died, stopped by
    :meth:`close`. Thread-safe: several saves' threads may call it at once.
    """

    def __init__(self, store: Store, *, threads: int) -> None:
        check_store(store)
        self.store = store
        self.threads = threads
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._calls: dict[int, tuple[Future[Any], str, Connection]] = {}
        self._reader: threading.Thread | None = None
        self._next = 0
        self._closed = False

    @property
    def pid(self) -> int | None:
        """The writer's process id while one runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def call(self, op: str, **args: Any) -> Future[Any]:
        """Send request ``op``; the future completes with its result or a :class:`WriterError`."""
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise WriterError("the writer process was stopped (checkpointer closed)")
            conn = self._start()
            self._next += 1
            call_id = self._next
            self._calls[call_id] = (future, op, conn)
            try:
                conn.send_bytes(json.dumps({"id": call_id, "op": op, **args}).encode())
            except (OSError, ValueError):
                # The pipe broke: the writer died. The reader thread fails the other calls.
                self._calls.pop(call_id, None)
                future.set_exception(self._death(op))
        return future

    def forget(self, name: str) -> None:
        """Tell a running writer to unmap segment ``name`` (no-op when none runs)."""
        with self._lock:
            if self._conn is None or self._closed:
                return
            try:
                self._conn.send_bytes(json.dumps({"id": 0, "op": "forget", "name": name}).encode())
            except (OSError, ValueError):
                pass  # a dead writer maps nothing

    def close(self) -> None:
        """Stop the writer: it finishes the requests it holds, then exits."""
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if conn is not None:
            try:
                conn.send_bytes(json.dumps({"id": 0, "op": "stop"}).encode())
            except (OSError, ValueError):
                pass
        if proc is not None:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(10)  # it closes the connection once the writer has exited

    def _start(self) -> Connection:
        """The connection to a live writer, starting one if needed (holding ``_lock``)."""
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            return self._conn
        # (a dead writer's connection is closed by its reply thread, once it reads EOF: only
        # that thread touches it, so its descriptor cannot be reused under it)
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        try:
            # A fresh interpreter (spawn semantics), but not multiprocessing's spawn: that
            # one re-imports the parent's __main__, which re-runs a training script that
            # lacks the ``if __name__ == "__main__"`` guard.
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, str(fd)],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        try:
            conn.send_bytes(json.dumps({"threads": self.threads, "path": sys.path}).encode())
            # How to rebuild the store (its __reduce__ as JSON): nothing is pickled.
            conn.send_bytes(json.dumps(store_recipe(self.store)).encode())
        except (OSError, TypeError, ValueError, AttributeError) as e:
            conn.close()
            proc.kill()
            proc.wait()
            raise WriterError(
                f"cannot start the writer process for {self.store!r}: {type(e).__name__}: {e}; "
                "the store's __reduce__ must name an importable factory with JSON arguments, "
                "or use writer='thread'"
            ) from e
        self._proc, self._conn = proc, conn
        self._reader = threading.Thread(
            target=self._read, args=(proc, conn), name="tlreg-ckpt-writer-replies", daemon=True
        )
        self._reader.start()
        return conn

    def _death(self, op: str, proc: subprocess.Popen[bytes] | None = None) -> WriterError:
        proc = proc or self._proc
        code = None
        if proc is not None:
            try:
                code = proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        how = f"exit code {code}" if code is not None else "no exit code"
        return WriterError(
            f"the checkpoint writer process (pid {proc.pid if proc else '?'}) died during "
            f"{op!r} ({how}); this save wrote no manifest, the next save starts a new writer"
        )

    def _read(self, proc: subprocess.Popen[bytes], conn: Connection) -> None:
        """Complete each call's future from the replies; fail them all if the writer dies."""
        while True:
            try:
                reply = json.loads(conn.recv_bytes())
            except (EOFError, OSError):
                break
            with self._lock:
                entry = self._calls.pop(reply["id"], None)
            if entry is None:
                continue
            future, op, _ = entry
            if "error" in reply:
                future.set_exception(
                    WriterError(f"the writer process failed {op!r}: {reply['error']}")
                )
            else:
                future.set_result(reply.get("result"))
        with self._lock:
            # only this writer's calls: a new writer may already serve later ones
            ids = [i for i, (_, _, c) in self._calls.items() if c is conn]
            calls = [self._calls.pop(i) for i in ids]
            if self._proc is proc:
                self._proc = None
                self._conn = None
        conn.close()
        for future, op, _ in calls:
            future.set_exception(self._death(op, proc))


# -- writer side ---------------------------------------------------------------------------


class _Segments:
    """Read-only mappings of the parent's shared segments, by name (kept until forgotten)."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[mmap.mmap, memoryview]] = {}
        self._lock = threading.Lock()

    def view(self, name: str) -> memoryview:
        with self._lock:
            entry = self._maps.get(name)
            if entry is None:
                # Mapped by path rather than through SharedMemory, so that this process never
                # registers the segment with the resource tracker: the parent owns it.
                fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
                try:
                    mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
                entry = self._maps[name] = (mapped, memoryview(mapped))
            return entry[1]

    def forget(self, name: str) -> None:
        with self._lock:
            entry = self._maps.pop(name, None)
        if entry is not None:
            entry[1].release()
            try:
                entry[0].close()
            except BufferError:
                pass  # a slice is still alive; the mapping goes with it

    def parts(self, spans: Sequence[Sequence[Any]]) -> list[memoryview]:
        out: list[memoryview] = []
        for name, offset, nbytes in spans:
            if name is None:
                while nbytes:
                    n = min(nbytes, _ZERO_PAD_MAX)
                    out.append(zero_pad(n))
                    nbytes -= n
            else:
                out.append(self.view(name)[offset : offset + nbytes])
        return out


_BOOT = "import sys; from tlreg.ckpt.writer import main; main(int(sys.argv[1]))"


def main(fd: int) -> None:
    """Entry point of the writer process: ``fd`` is its end of the parent's socket pair."""
    conn = Connection(fd)
    try:
        hello = json.loads(conn.recv_bytes())
        for entry in hello["path"]:  # so that the store's class imports as in the parent
            if entry not in sys.path:
                sys.path.append(entry)
        store = build_store(json.loads(conn.recv_bytes()))  # the parent's store (see _start)
    except (EOFError, OSError):
        os._exit(0)
    serve(conn, store, int(hello["threads"]))


def serve(conn: Connection, store: Store, threads: int) -> None:
    """The writer process's main loop."""
    segments = _Segments()
    requests = ThreadPoolExecutor(threads, thread_name_prefix="tlreg-writer")
    puts = ThreadPoolExecutor(threads, thread_name_prefix="tlreg-writer-io")
    send_lock = threading.Lock()

    def reply(doc: dict[str, Any]) -> None:
        with send_lock:
            conn.send_bytes(json.dumps(doc).encode())

    def write(digest: str, parts: list[memoryview], nbytes: int) -> int | None:
        """Write an object's chunks unless it is stored; its chunk size, or None."""
        futures: list[Future[None]] = []
        layout = write_unless_stored(
            store,
            digest,
            parts,
            nbytes,
            lambda key, chunk: futures.append(puts.submit(store.put, key, chunk)),
        )
        for future in futures:
            future.result()
        return None if layout is None else layout.chunk

    def handle(msg: dict[str, Any]) -> Any:
        op = msg["op"]
        if op == "hash":
            return [hash_parts(segments.parts([span])) for span in msg["spans"]]
        if op == "object":
            return write(msg["digest"], segments.parts(msg["spans"]), msg["nbytes"])
        if op == "pack":
            parts = segments.parts(msg["spans"])
            digest = hash_parts(parts)
            return [digest, write(digest, parts, msg["nbytes"])]
        if op == "meta":
            futures = [
                puts.submit(write_marker, store, d, ObjectLayout(n, c))
                for d, n, c in msg["objects"]
            ]
            for future in futures:
                future.result()
            return None
        raise ValueError(f"unknown request {op!r}")

    def run(msg: dict[str, Any]) -> None:
        try:
            result = handle(msg)
        except BaseException as e:
            last = traceback.extract_tb(e.__traceback__)[-1:]
            where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
            doc = {"id": msg["id"], "error": f"{type(e).__name__}: {e}{where}"}
        else:
            doc = {"id": msg["id"], "result": result}
        try:
            reply(doc)
        except (OSError, ValueError):
            pass  # the parent is gone

    while True:
        try:
            msg = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            # The parent died (or closed the pipe): nobody will read what we write.
            os._exit(0)
        if msg["op"] == "stop":
            break
        if msg["op"] == "forget":
            segments.forget(msg["name"])
            continue
        requests.submit(run, msg)
    requests.shutdown()
    puts.shutdown()
    conn.close()
