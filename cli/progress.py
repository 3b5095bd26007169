"""Progress for long commands: one small API over tqdm, shared by every command.

On a terminal a :class:`Progress` is a tqdm bar (``step 40/200 |████ | 3.1 it/s ETA 0:12``)
that tqdm redraws in place, so no stale characters stay behind. Elsewhere (a pipe, a log
file, a batch job's output) it writes plain lines: one when it starts, one every
``every_s`` seconds at most, and one when it ends, each with N/M, the rate and the ETA, so a
log is readable and does not fill with carriage returns.

    with progress("import", total=nbytes, unit="B") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))

    with progress("step", total=200, initial=60, postfix={"ckpt": "-"}) as bar:
        bar.update_to(80, ckpt="01a251e07114", loss="0.3110")

Messages between updates go through :meth:`Progress.write`, which keeps the bar below them.
Progress goes to stderr by default, so stdout stays the command's result (``--json``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import IO, Any

from tqdm import tqdm

from tlreg.cli.units import fmt_bytes

PLAIN_EVERY_S = 10.0
"""Seconds between two lines of a plain (not a terminal) progress report."""


def fmt_duration(seconds: float) -> str:
    """``0:12``, ``3:05``, ``1:02:03``: the form of an elapsed time or an ETA."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fmt_amount(n: float, unit: str) -> str:
    return fmt_bytes(n) if unit == "B" else f"{int(n)}"


class Progress:
    """A progress report of work counted in ``unit`` (a bar on a terminal, lines elsewhere).

    ``total`` may be None when it is not known; then no ETA is shown. ``initial`` is where
    counting starts (a resumed run starts at its checkpoint's step): the rate and the ETA
    count only the work done by this process. With ``announce`` False, plain mode waits
    ``every_s`` before its first line. ``clock`` is for tests.
    """

    def __init__(
        self,
        desc: str,
        *,
        total: float | None,
        unit: str = "it",
        initial: float = 0,
        postfix: Mapping[str, Any] | None = None,
        file: IO[str] | None = None,
        plain: bool | None = None,
        every_s: float = PLAIN_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        announce: bool = True,
    ) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.postfix: dict[str, Any] = dict(postfix or {})
        self.file = file if file is not None else sys.stderr
        self.plain = (not self.file.isatty()) if plain is None else plain
        self.every_s = every_s
        self.clock = clock
        self.started = clock()
        self._last_line = float("-inf")
        self._closed = False
        self._bar: tqdm[Any] | None = None
        if self.plain:
            if announce:
                self._line(force=True)
            else:  # the first line only once the work has gone on for every_s
                self._last_line = self.started
        else:
            self._bar = tqdm(
                desc=desc,
                total=total,
                initial=initial,
                unit=unit,
                unit_scale=unit == "B",
                unit_divisor=1024,
                file=self.file,
                dynamic_ncols=True,
                leave=True,
                # N/M, a bar, the rate and the ETA; the postfix carries the caller's columns.
                bar_format=(
                    "{desc} {n_fmt}/{total_fmt} |{bar}| {rate_fmt} ETA {remaining}{postfix}"
                    if total is not None
                    else "{desc} {n_fmt} {rate_fmt} {elapsed}{postfix}"
                ),
            )
            self._bar.set_postfix(self.postfix, refresh=False)

    # -- updates ------------------------------------------------------------------------

    def update(self, amount: float = 1, **postfix: Any) -> None:
        """Count ``amount`` more units done; ``postfix`` replaces those columns."""
        self.update_to(self.n + amount, **postfix)

    def update_to(self, n: float, **postfix: Any) -> None:
        """Set the count done to ``n``; ``postfix`` replaces those columns."""
        self.postfix.update(postfix)
        delta = n - self.n
        self.n = n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self.postfix, refresh=False)
            self._bar.update(delta)
            if postfix and delta == 0:
                self._bar.refresh()
        else:
            self._line()

    def write(self, message: str) -> None:
        """Print ``message`` on a line of its own (above the bar on a terminal)."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            print(message, file=self.file, flush=True)

    def abandon(self) -> None:
        """End the report of work that failed: plain mode prints no last line."""
        if self._bar is None:
            self._closed = True
        self.close()

    def close(self) -> None:
        """End the report: the bar stays as it was drawn last; plain mode prints a last line."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(force=True, done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- plain mode -----------------------------------------------------------------------

    @property
    def rate(self) -> float | None:
        """Units per second done by this process so far (None before any)."""
        elapsed = self.clock() - self.started
        done = self.n - self.initial
        return done / elapsed if elapsed > 0 and done > 0 else None

    def plain_line(self, *, done: bool = False) -> str:
        """The line plain mode prints now (also what a test compares against)."""
        amount = _fmt_amount(self.n, self.unit)
        if self.total is not None:
            amount += f"/{_fmt_amount(self.total, self.unit)}"
        parts = [f"{self.desc} {amount}"]
        rate = self.rate
        unit = self.unit
        if rate is not None:
            parts.append(f"{_fmt_amount(rate, unit)}/s" if unit == "B" else f"{rate:.2f} {unit}/s")
        if done:
            parts.append(f"in {fmt_duration(self.clock() - self.started)}")
        elif rate is not None and self.total is not None:
            parts.append(f"ETA {fmt_duration((self.total - self.n) / rate)}")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        return "  ".join(parts)

    def _line(self, *, force: bool = False, done: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_line < self.every_s:
            return
        self._last_line = now
        print(self.plain_line(done=done), file=self.file, flush=True)


@contextmanager
def progress(desc: str, *, total: float | None, **options: Any) -> Iterator[Progress]:
    """A :class:`Progress` closed on exit (see the module docstring for an example).

    In plain mode it prints nothing for work shorter than ``every_s`` but its last line, and
    no last line when the work raises: a command that fails says so in its one error line.
    """
    bar = Progress(desc, total=total, **{"announce": False, **options})
    try:
        yield bar
    except BaseException:
        bar.abandon()
        raise
    bar.close()
