"""The transfer-learning demo behind ``make demo``.

It drives the real ``tlreg`` command line in a throw-away home (SQLite registry, local
store, local Ray): train an ancestor on digits 0-4, branch three ways for digits 5-9
(frozen features, full fine-tune, from scratch), draw the lineage, then compare steps and
wall time to a common validation accuracy and the bytes each branch stored; finally write
the comparison plot (``tlreg plot``) and the self-contained lineage page (``tlreg lineage
--html``) to ``--out`` and print their paths.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tlreg.ckpt import read_manifest
from tlreg.registry import Registry
from tlreg.storage_backends import open_store
from tlreg.training import load_settings

DIGITS = "tlreg.training.examples.digits"


def tlreg(*args: str, home: Path, capture: bool = False) -> str:
    """Run one ``tlreg`` command like a user would; stop the demo if it fails."""
    cmd = [sys.executable, "-m", "tlreg.cli", *args]
    print(f"$ tlreg {' '.join(_quote(a) for a in args)}", flush=True)
    env = {**os.environ, "TLREG_HOME": str(home)}
    done = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE if capture else None)
    if done.returncode != 0:
        raise SystemExit(f"demo stopped: `tlreg {args[0]}` exited with {done.returncode}")
    return done.stdout or ""


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in "*? ") else arg


def train(
    branch: str,
    task: str,
    home: Path,
    *extra: str,
    steps: int,
    checkpoint_every: int = 50,
    eval_every: int = 5,
) -> dict[str, Any]:
    """``tlreg train BRANCH --task TASK ... --json`` on 2 workers; returns the summary."""
    out = tlreg(
        "train",
        branch,
        "--task",
        task,
        "--workers",
        "2",
        "--steps",
        str(steps),
        "--checkpoint-every",
        str(checkpoint_every),
        "--eval-every",
        str(eval_every),
        *extra,
        "--json",
        home=home,
        capture=True,
    )
    summary: dict[str, Any] = json.loads(out)
    last = summary["evals"][-1]
    print(
        f"  -> {len(summary['checkpoints'])} checkpoints, final {last['metric_name']} "
        f"{last['metric']:.3f}, {summary['wall_s']:.1f} s\n",
        flush=True,
    )
    return summary


def first_reaching(summary: dict[str, Any], target: float) -> tuple[str, str]:
    for e in summary["evals"]:
        if e["metric"] >= target:
            return str(e["step"]), f"{e['elapsed_s']:.2f}"
    return "not reached", "-"


def frozen_new_bytes(home: Path, branch: str, prefix: str) -> int:
    """Bytes of ``prefix`` tensors this branch stored in objects no other branch references."""
    settings = load_settings(home=home)
    registry = Registry(settings.registry_url)
    store = open_store(settings.store_url)
    try:
        own = [r for r in registry.log(branch) if r.branch == branch]
        others = {
            obj
            for r in registry.checkpoints()
            if r.branch != branch
            for obj in read_manifest(store, r.manifest).objects
        }
        total = 0
        for r in own:
            m = read_manifest(store, r.manifest)
            total += sum(
                e.nbytes
                for path, e in m.tensors.items()
                if path.startswith(prefix) and e.object not in others
            )
        return total
    finally:
        registry.close()


def branch_bytes(home: Path, branch: str) -> tuple[int, int]:
    registry = Registry(load_settings(home=home).registry_url)
    try:
        return registry.branch_bytes(branch)
    finally:
        registry.close()


def comparison(
    home: Path,
    rows: list[tuple[str, str, dict[str, Any]]],
    target: float,
    title: str,
    frozen_prefix: str,
) -> list[str]:
    """A Markdown table: steps and seconds to ``target``, final metric, bytes per branch."""
    header = (
        title,
        f"steps to {target:.0%}",
        "seconds",
        "final",
        "stored (logical)",
        "new bytes",
        f"new bytes in {frozen_prefix.removeprefix('model/')}*",
    )
    table = []
    for label, branch, summary in rows:
        reached_step, reached_s = first_reaching(summary, target)
        logical, new = branch_bytes(home, branch)
        table.append(
            (
                label,
                reached_step,
                reached_s,
                f"{summary['evals'][-1]['metric']:.3f}",
                f"{logical:,}",
                f"{new:,}",
                f"{frozen_new_bytes(home, branch, frozen_prefix):,}",
            )
        )
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in table]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", help="Keep the demo's tlreg home here instead of a temp dir.")
    parser.add_argument("--steps", type=int, default=200, help="Steps per training run.")
    parser.add_argument("--target", type=float, default=0.95, help="Validation accuracy to reach.")
    parser.add_argument(
        "--out",
        default="demo-output",
        help="Folder for the comparison plot and the lineage page (default ./demo-output).",
    )
    args = parser.parse_args(argv)
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="tlreg-demo-"))
    try:
        run(home, args.steps, args.target, Path(args.out).resolve())
    finally:
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)


def run(home: Path, steps: int, target: float, out: Path) -> None:
    print(f"tlreg demo in {home}\n", flush=True)
    tlreg("init", home=home)
    tlreg("branch", "base", "--task", f"{DIGITS}:lower", home=home)
    train("base", f"{DIGITS}:lower", home, steps=steps)

    tlreg("branch", "upper-head", "base", "--task", f"{DIGITS}:upper", home=home)
    head = train("upper-head", f"{DIGITS}:upper", home, "--freeze", "features.*", steps=steps)
    tlreg("branch", "upper-full", "base", "--task", f"{DIGITS}:upper", home=home)
    full = train("upper-full", f"{DIGITS}:upper", home, steps=steps)
    tlreg("branch", "upper-scratch", "--task", f"{DIGITS}:upper", home=home)
    scratch = train("upper-scratch", f"{DIGITS}:upper", home, steps=steps)

    tlreg("lineage", "base", home=home)
    print()
    rows = [
        ("from scratch", "upper-scratch", scratch),
        ("ancestor, frozen features", "upper-head", head),
        ("ancestor, full fine-tune", "upper-full", full),
    ]
    print("\n".join(comparison(home, rows, target, "digits 5-9", "model/features.")))
    print("\nSeconds count from the first training step (Ray start-up excluded).\n")

    # The same comparison from the stored evaluation curves, as a chart and a lineage page.
    branches = [branch for _, branch, _ in rows]
    metric = ("-m", "val_accuracy", "-t", str(target))
    tlreg("compare", *branches, *metric, home=home)
    print()
    plot = tlreg(
        "plot", "base", *branches, *metric, "-o", str(out / "compare"), home=home, capture=True
    )
    page = tlreg("lineage", "base", "--html", str(out / "lineage.html"), home=home, capture=True)
    print("\nwrote:")
    for path in [*plot.splitlines(), *page.splitlines()]:
        print(f"  {path}")
    print("browse the lineage with: TLREG_HOME=<home> tlreg ui  (keep the home with --home)")


if __name__ == "__main__":
    main()
