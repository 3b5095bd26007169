"""Fixtures: every registry test runs against SQLite (a temporary file) and PostgreSQL (a fresh
database per test on the server at 127.0.0.1:5432)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tlreg.registry import Registry

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty registry database, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
        return
    name = f"tlreg_{uuid.uuid4().hex}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432: {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield PG_URL.format(name=name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    """An open registry on an empty database; closed after the test."""
    reg = Registry(registry_url)
    try:
        yield reg
    finally:
        reg.close()
