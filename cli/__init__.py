"""The ``tlreg`` command line: formatting only, every command calls the Python API.

Rooms (one module per group of commands):

- ``main``: the ``tlreg`` group, its global options, and ``tlreg init``.
- ``common``: what every command shares: settings, registry and store handles, errors, output.
- ``branches``: ``tlreg branch``, ``tlreg branches`` and ``tlreg tag``.
- ``history``: ``tlreg log``, ``lineage``, ``show``, ``diff`` and ``runs``: what happened.
- ``train``: ``tlreg train``, its options taken from ``TrainConfig``, and its progress lines.
- ``jobs``: ``tlreg submit``, ``tlreg train`` as a Ray job.
- ``weights``: ``tlreg import``, ``tlreg export`` and ``tlreg verify``.
- ``maintenance``: ``tlreg gc`` and ``tlreg upgrade``.
- ``__main__``: ``python -m tlreg.cli``.
"""
