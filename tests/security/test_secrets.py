"""Credentials never land in anything tlreg writes.

A whole session — init, import, branch, a training run on Ray, tag, verify, diff, export, gc,
runs — runs against the real S3 server (its secret key in ``AWS_SECRET_ACCESS_KEY``) and
PostgreSQL (a password planted in the registry URL). Afterwards every artifact is searched for
the secrets: every object in the bucket, every row of every registry table, every file in the
tlreg home (tlreg.toml, Ray Train's run folder), every file of the Ray session (its logs), and
everything each command printed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from safetensors.torch import save_file
from sqlalchemy.engine import make_url

from tlreg.training.examples.digits import lower

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.postgres]

PLANTED_PASSWORD = "pw-PLANTED-8d1e5c"


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private folder for Ray's session files (socket paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="tlr-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _registry_dump(registry_url: str) -> str:
    url = make_url(registry_url)
    schema = url.query["options"].split("search_path=")[1]  # type: ignore[union-attr]
    dsn = f"postgresql://postgres@127.0.0.1:5432/{url.database}"
    out = []
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
        assert len(tables) >= 5
        for (table,) in tables:
            rows = conn.execute(f'SELECT * FROM "{schema}"."{table}"').fetchall()
            out.append(f"{table}: {rows!r}")
    return "\n".join(out)


def _files(root: Path) -> Iterator[tuple[str, bytes]]:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            yield str(path), path.read_bytes()


@pytest.mark.parametrize("registry_url", ["postgres"], indirect=True)
def test_planted_credentials_appear_in_no_artifact(
    make_shell: Callable[..., Any],
    registry_url: str,
    s3_server: Any,
    s3_bucket_url: str,
    tmp_path: Path,
    ray_tmp: Path,
) -> None:
    with_password = registry_url.replace("postgres@", f"postgres:{PLANTED_PASSWORD}@")
    assert make_url(with_password).password == PLANTED_PASSWORD
    shell = make_shell(with_password, s3_bucket_url)
    shell.env["RAY_TMPDIR"] = str(ray_tmp)
    secrets = {
        "PostgreSQL password": PLANTED_PASSWORD,
        "S3 secret key": s3_server.secret_key,
    }
    printed: list[str] = []
    weights = tmp_path / "ancestor.safetensors"
    save_file({k: v.contiguous() for k, v in lower.build_model(3).state_dict().items()}, weights)

    printed.append(shell.tlreg("init"))
    printed.append(shell.tlreg("import", str(weights), "--name", "base"))
    printed.append(
        shell.tlreg("branch", "head", "base", "--task", "tlreg.training.examples.digits:upper")
    )
    proc = shell.popen(
        "train", "head", "--workers", "1", "--steps", "10", "--checkpoint-every", "5", "--json"
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    printed += [out, err]
    assert json.loads(out)["status"] == "succeeded"
    for args in (
        ("tag", "head", "v1"),
        ("verify", "head"),
        ("diff", "base", "head"),
        ("export", "head", str(tmp_path / "out.safetensors")),
        ("gc", "--dry-run"),
        ("runs", "--json"),
        ("log", "head", "--json"),
        ("show", "v1", "--json"),
        ("lineage", "base"),
    ):
        printed.append(shell.tlreg(*args))

    bucket = s3_bucket_url.removeprefix("s3://").split("/")[0]
    artifacts: list[tuple[str, bytes]] = [
        (f"s3://{key}", s3_server.fs.cat_file(key)) for key in s3_server.fs.find(bucket)
    ]
    assert any("manifests/" in name for name, _ in artifacts)
    artifacts.append(("registry rows", _registry_dump(registry_url).encode()))
    artifacts += list(_files(shell.home))
    ray_logs = list(_files(ray_tmp))
    assert any("/logs/" in name for name, _ in ray_logs), "the Ray session wrote no logs here"
    artifacts += ray_logs
    artifacts += [(f"output {i}", text.encode()) for i, text in enumerate(printed)]
    found = [
        f"{what} in {name}"
        for name, data in artifacts
        for what, secret in secrets.items()
        if secret.encode() in data
    ]
    assert found == []
    assert len(artifacts) > 50
