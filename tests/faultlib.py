"""Shared by the fault-injection cases: the trial setting and the session-wide tallies.

``TLREG_STRESS=1`` (what ``make stress`` sets) switches every case to its long setting.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections import Counter
from typing import Any

STRESS = os.environ.get("TLREG_STRESS", "") not in ("", "0")

COUNTS: Counter[str] = Counter()
"""What the cases tally (trials, checkpoints committed and lost, corruptions detected, ...)."""


def trials(short: int, long: int) -> int:
    """How many times a case repeats: ``long`` under ``make stress``, else ``short``."""
    return long if STRESS else short


class TcpProxy:
    """A loopback TCP relay in front of a real server, which a test can cut and restore.

    ``stop()`` closes the listening socket and resets every relayed connection, so clients see
    exactly what a stopped server gives them (refused connections, broken sockets);
    ``start()`` listens again on the same port. With ``reset_next = n`` the next ``n``
    connections are reset as soon as they are accepted; with ``cut_next = n`` the next ``n``
    connections are reset once ``cut_after`` bytes of the server's replies went through (a
    response that breaks mid-body); ``accepted`` counts connections.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target_port = host, target_port
        self.port = 0
        self.reset_next = 0
        """Connections to reset at once (a server that crashes on them), before relaying."""
        self.accepted = 0
        self.cut_next = 0
        """Connections to reset mid-reply, after ``cut_after`` bytes from the server."""
        self.cut_after = 0
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # shutdown first: close() alone leaves the socket open while a relay thread
                # is blocked in recv() on it, and the client would wait for its read timeout
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # stopped
            self.accepted += 1
            if self.reset_next > 0:
                self.reset_next -= 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection((self.host, self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns |= {client, upstream}
            limit = None
            if self.cut_next > 0:
                self.cut_next -= 1
                limit = self.cut_after
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, limit), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, limit: int | None = None) -> None:
        try:
            while data := src.recv(65536):
                if limit is not None and len(data) >= limit:
                    dst.sendall(data[:limit])
                    # a reset in the middle of the reply (shutdown first, as in stop())
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    for s in (dst, src):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                        with contextlib.suppress(OSError):
                            s.close()
                    return
                dst.sendall(data)
                if limit is not None:
                    limit -= len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


_summarised = False


def summarise(terminalreporter: Any) -> None:
    """Print :data:`COUNTS` once per run (several suites' conftests ask for it)."""
    global _summarised
    if _summarised or not COUNTS:
        return
    _summarised = True
    terminalreporter.section(f"fault injection and bad input ({'stress' if STRESS else 'short'})")
    for key in sorted(COUNTS):
        terminalreporter.write_line(f"{key:<64} {COUNTS[key]:>8}")
