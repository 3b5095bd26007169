"""The ``tlreg`` command line: formatting only, every command calls the Python API."""
