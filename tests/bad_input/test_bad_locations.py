"""Stores and registries that cannot be used: one line naming them and the fix, nothing written.

Unknown URL schemes (with an install hint where fsspec knows the package), databases tlreg
does not support or cannot reach, and, against the real S3 server, wrong credentials and a
missing bucket. No secret is ever printed, and ``init`` writes nothing when it fails.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tlreg.registry import Registry


def _one_line_error(result: object, *needles: str) -> str:
    out: str = result.output  # type: ignore[attr-defined]
    assert result.exit_code == 1, out  # type: ignore[attr-defined]
    assert out.startswith("Error: ") and out.count("\n") == 1, out
    for needle in needles:
        assert needle in out, out
    return out


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    "url, needles",
    [
        ("gs://bucket/prefix", ("gs://bucket/prefix", "gcsfs", "pip install")),
        ("foo://somewhere", ("unknown store URL scheme 'foo://'", "s3://")),
        ("", ("empty store URL",)),
    ],
)
def test_unusable_store_urls_are_refused_and_init_writes_nothing(
    tlreg: Callable, home: Path, url: str, needles: tuple[str, ...]
) -> None:
    _one_line_error(tlreg("--store", url, "init"), *needles)
    assert not home.exists() or list(home.iterdir()) == []


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_unsupported_and_unreachable_registries_are_named_without_their_password(
    tlreg: Callable, home: Path
) -> None:
    _one_line_error(
        tlreg("--registry", "mysql://user@db/tlreg", "init"), "mysql", "postgresql+psycopg://"
    )
    url = f"postgresql+psycopg://tlreg:s3cr3t-pw@127.0.0.1:{_closed_port()}/tlreg"
    out = _one_line_error(tlreg("--registry", url, "log", "main"), "unreachable", "***")
    assert "s3cr3t-pw" not in out
    _one_line_error(tlreg("--registry", "not a url", "log", "main"), "not a url")
    bad_timeout = f"sqlite:///{home}/r.db?timeout=soon"
    _one_line_error(tlreg("--registry", bad_timeout, "log", "main"), "timeout", "seconds")
    assert not (home / "tlreg.toml").exists()


@pytest.mark.s3
@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_wrong_s3_credentials_fail_at_once_naming_the_bucket_never_the_secret(
    tlreg: Callable, home: Path, s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_bucket_url.split("/")[2]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789abcdef")
    out = _one_line_error(tlreg("--store", s3_bucket_url, "init"), bucket)
    assert "wrong-secret-0123456789abcdef" not in out
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY0123456789")
    out = _one_line_error(tlreg("--store", s3_bucket_url, "init"), bucket)
    assert "wrong-secret" not in out
    assert not home.exists() or list(home.iterdir()) == []


@pytest.mark.s3
@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_a_missing_bucket_is_named_with_the_fix(
    tlreg: Callable, home: Path, s3_bucket_url: str
) -> None:
    missing = "tlreg-no-such-bucket-4711"
    _one_line_error(tlreg("--store", f"s3://{missing}/prefix", "init"), missing)
    assert not home.exists() or list(home.iterdir()) == []


@pytest.mark.parametrize("registry_url", ["sqlite"], indirect=True)
def test_init_against_an_unreachable_registry_leaves_no_store_folder(
    tlreg: Callable, home: Path, tmp_path: Path
) -> None:
    store = tmp_path / "new" / "nested" / "store"
    registry = f"postgresql+psycopg://tlreg@127.0.0.1:{_closed_port()}/tlreg"
    _one_line_error(tlreg("--store", str(store), "--registry", registry, "init"), "unreachable")
    assert not (tmp_path / "new").exists()
    assert not home.exists() or list(home.iterdir()) == []


@pytest.mark.postgres
@pytest.mark.parametrize("registry_url", ["postgres"], indirect=True)
def test_init_with_a_read_only_registry_role_writes_no_config_and_no_store_folder(
    tlreg: Callable, home: Path, tmp_path: Path, registry_url: str
) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    Registry(registry_url).close()  # the schema exists, made by its owner
    url = make_url(registry_url)
    schema = url.query["options"].split("=", 1)[1]
    role = f"tlreg_ro_{uuid.uuid4().hex[:12]}"
    dsn = f"postgresql://postgres@127.0.0.1:5432/{url.database}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE ROLE "{role}" LOGIN')
        try:
            conn.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
            conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
            read_only = url.set(username=role).render_as_string(hide_password=False)
            store = tmp_path / "new" / "store"

            out = _one_line_error(
                tlreg("--store", str(store), "--registry", read_only, "init"),
                "permission denied",
                "permissions",
            )

            assert "store_url" not in out
            assert not (tmp_path / "new").exists()
            assert not home.exists() or list(home.iterdir()) == []
            with Registry(registry_url) as registry:
                assert registry.get_meta("store_url") is None
        finally:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                (role,),
            )
            conn.execute(f'DROP OWNED BY "{role}"')
            conn.execute(f'DROP ROLE "{role}"')
