"""``python -m tlreg.cli``: the same as the ``tlreg`` console script."""

from tlreg.cli.main import main

main()
