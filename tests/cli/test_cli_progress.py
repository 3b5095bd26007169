"""cli/progress.py: N/M, rate and ETA on a terminal (tqdm) and in plain lines elsewhere."""

from __future__ import annotations

import io
import re

import pytest

from tlreg.cli.progress import Progress, fmt_duration, progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_mode_prints_start_and_end_lines_with_n_of_m_rate_and_duration() -> None:
    out = io.StringIO()  # not a terminal: plain lines
    with progress("step", total=200, initial=60, file=out, every_s=3600, announce=True) as bar:
        bar.update_to(80, ckpt="01a251e07114")
        bar.update_to(200, ckpt="01a251e081ca")
    lines = out.getvalue().splitlines()
    assert lines[0] == "step 60/200"
    assert len(lines) == 2  # the update lines were within every_s of the first
    assert re.fullmatch(r"step 200/200  [\d.]+ it/s  in 0:00  ckpt 01a251e081ca", lines[1])
    assert "\r" not in out.getvalue()


def test_plain_mode_shows_the_eta_of_the_work_left() -> None:
    now = [100.0]
    bar = Progress(
        "import", total=4096, unit="B", file=io.StringIO(), every_s=3600, clock=lambda: now[0]
    )
    now[0] += 2.0
    bar.update(1024)
    # 1 KiB in 2 s: 3 KiB left is 6 s.
    assert bar.plain_line() == "import 1.0 KiB/4.0 KiB  512 B/s  ETA 0:06"
    bar.close()


def test_terminal_mode_draws_a_bar_with_n_of_m_and_messages_above_it() -> None:
    out = _Tty()
    with progress("step", total=10, file=out) as bar:
        bar.write("checkpoint at step 5 failed")
        bar.update(5, ckpt="abc")
    text = out.getvalue()
    assert "checkpoint at step 5 failed\n" in text
    assert "step 5/10 |" in text
    assert "ckpt=abc" in text


def test_durations_read_like_a_clock() -> None:
    assert [fmt_duration(s) for s in (0, 12.4, 185, 3723)] == ["0:00", "0:12", "3:05", "1:02:03"]


def test_work_that_fails_prints_no_progress_line_and_short_work_only_its_last() -> None:
    out = io.StringIO()
    with pytest.raises(RuntimeError), progress("import", total=100, unit="B", file=out) as bar:
        bar.update(40)
        raise RuntimeError("the store refused a write")
    assert out.getvalue() == ""  # the command's one error line says what happened
    with progress("import", total=100, unit="B", file=out, plain=True) as bar:
        bar.update(100)
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("import 100 B/100 B")
