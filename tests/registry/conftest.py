"""Registry tests use the ``registry_url`` and ``registry`` fixtures of ``tests/conftest.py``:
every test runs on SQLite (a temporary file) and on PostgreSQL (a fresh schema per test)."""
