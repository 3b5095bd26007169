"""Tasks: groups of tasks on a shared thread pool, and chaining a future.

The persist and restore stages fan their byte work out over the checkpointer's I/O pool as
one :class:`Tasks` group per save or load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

_T = TypeVar("_T")


class Tasks:
    """Tasks on a shared pool that the submitter waits for as a group.

    Tasks may submit further tasks; the first error stops the tasks not yet started and is
    re-raised by :meth:`wait`. Tasks never wait on each other, so the pool cannot deadlock.
    """

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None

    def submit(self, fn: Callable[..., _T], *args: Any) -> Future[_T]:
        with self._cond:
            self._pending += 1
        try:
            return self._pool.submit(self._run, fn, *args)
        except BaseException:
            self._done()
            raise

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            if self._error is not None:
                return None
            return fn(*args)
        except BaseException as e:
            with self._cond:
                if self._error is None:
                    self._error = e
            raise
        finally:
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._pending -= 1
            if self._pending == 0:
                self._cond.notify_all()

    def wait(self) -> None:
        """Wait for every task; re-raise the first error."""
        self.drain()
        if self._error is not None:
            raise self._error

    def drain(self) -> None:
        """Wait for every task, raising nothing (before giving up buffers tasks still read)."""
        with self._cond:
            while self._pending:
                self._cond.wait()


def then(future: Future[Any], fn: Callable[[Any], _T]) -> Future[_T]:
    """A future of ``fn(future.result())``, or of the same error."""
    out: Future[_T] = Future()

    def done(f: Future[Any]) -> None:
        error = f.exception()
        if error is not None:
            out.set_exception(error)
            return
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:
            out.set_exception(e)

    future.add_done_callback(done)
    return out
