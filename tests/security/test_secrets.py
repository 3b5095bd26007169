"""Credentials never land in anything tlreg writes or prints.

A whole session — init, import, branch, a training run on Ray, tag, verify, diff, export, gc,
runs — runs against the real S3 server (its secret key in ``AWS_SECRET_ACCESS_KEY``) and
PostgreSQL (a password planted in the registry URL). Afterwards every artifact is searched for
the secrets: every object in the bucket, every row of every registry table, every file in the
tlreg home (tlreg.toml, Ray Train's run folder), every file of the Ray session (its logs), and
everything each command printed. A second session does the same with a password planted in
the store URL of a real FTP server; and a store URL with a planted secret, for every scheme
whose URL takes one, is shown, refused and written down without it.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer
from safetensors.torch import save_file
from sqlalchemy.engine import make_url

from tlreg.cli.main import cli
from tlreg.registry import Registry
from tlreg.storage_backends import StoreError, open_store
from tlreg.storage_backends.credentials import url_secrets, without_password
from tlreg.training import Settings, TrainConfig, write_settings
from tlreg.training.driver import recorded_config
from tlreg.training.examples.digits import lower

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


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.postgres
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
        ("tag", "v1", "head"),
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


# -- secrets in store URLs ---------------------------------------------------------------------

STORE_PASSWORD = "pw-STORE-PLANTED-51c7"
"""A password planted in store URLs; no command may print it or write it anywhere."""


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _store_urls() -> list[Any]:
    """A store URL with a planted secret for every scheme whose URL takes one: a login's
    password (``//user:password@``) or a secret query parameter; each points at a port
    where nothing listens, so that every one of them fails somewhere after parsing."""
    port = _closed_port()
    pw = STORE_PASSWORD
    urls = {
        "s3": f"s3://AKIDPLANTED:{pw}@bucket/prefix",
        "s3a": f"s3a://AKIDPLANTED:{pw}@bucket/prefix",
        "ftp": f"ftp://alice:{pw}@127.0.0.1:{port}/store",
        "ftp-percent-encoded": f"ftp://alice:{pw.replace('-', '%2D')}@127.0.0.1:{port}/store",
        "sftp": f"sftp://alice:{pw}@127.0.0.1:{port}/store",
        "smb": f"smb://alice:{pw}@127.0.0.1:{port}/share/store",
        "webdav": f"webdav://alice:{pw}@127.0.0.1:{port}/store",
        "http": f"http://alice:{pw}@127.0.0.1:{port}/store",
        "https": f"https://alice:{pw}@127.0.0.1:{port}/store",
        "hdfs": f"hdfs://alice:{pw}@127.0.0.1:{port}/store",
        "chained": f"simplecache::ftp://alice:{pw}@127.0.0.1:{port}/store",
        "query-token": f"https://127.0.0.1:{port}/store?sas_token={pw}&x=1",
        "query-signature": f"https://127.0.0.1:{port}/store?X-Amz-Signature={pw}",
        "postgresql": f"postgresql+psycopg://alice:{pw}@127.0.0.1:{port}/db",
    }
    return [pytest.param(url, id=name) for name, url in urls.items()]


@pytest.mark.parametrize("url", _store_urls())
def test_the_one_helper_finds_every_store_url_secret(url: str) -> None:
    removed, masked = without_password(url), without_password(url, mask=True)
    for shown in (removed, masked):
        assert STORE_PASSWORD not in shown
        assert STORE_PASSWORD.replace("-", "%2D") not in shown
    assert "***" in masked
    assert STORE_PASSWORD in url_secrets(url)
    assert without_password(removed) == removed  # nothing left to remove
    assert url_secrets(removed) == []


@pytest.mark.parametrize("url", _store_urls())
def test_a_store_url_secret_is_in_no_message_file_or_row(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each URL is refused somewhere (no backend, nothing listening, a scheme that is no
    store): the one-line error, tlreg.toml, the registry and the pickled store hold no
    secret; a store that opens shows the URL without it."""
    home = tmp_path / "home"
    for var in ("TLREG_HOME", "TLREG_REGISTRY_URL", "TLREG_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    registry_url = f"sqlite:///{home / 'registry.db'}"
    result = CliRunner().invoke(
        cli,
        ["--home", str(home), "--registry", registry_url, "--store", url, "init"],
        catch_exceptions=False,
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert STORE_PASSWORD not in result.output
    assert not (home / "tlreg.toml").exists()  # a failed init writes no settings

    try:
        store = open_store(url)
    except (StoreError, ValueError, NotImplementedError) as e:
        assert STORE_PASSWORD not in f"{e!r} {e}"
    else:  # backends that connect lazily (http): shown, pickled and failing without it
        assert STORE_PASSWORD not in repr(store) + str(store.url)
        assert STORE_PASSWORD.encode() not in pickle.dumps(store)
        with pytest.raises(Exception) as failure:
            store.get("manifests/none")
        assert STORE_PASSWORD not in str(failure.value)

    # what tlreg writes down for it: the settings file and a Run's recorded config
    path = write_settings(Settings(home=home, registry_url=registry_url, store_url=url))
    assert STORE_PASSWORD not in path.read_text()
    assert without_password(url) in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    config = TrainConfig(branch="b", task="m:t", registry_url=registry_url, store_url=url)
    assert STORE_PASSWORD not in json.dumps(recorded_config(config))
    for name, data in _files(home):
        assert STORE_PASSWORD.encode() not in data, name


class _FtpServer:
    """A real FTP server (pyftpdlib) on a free loopback port, one user, one folder."""

    def __init__(self, root: Path, user: str, password: str) -> None:
        self.root, self.user = root, user
        authorizer = DummyAuthorizer()
        authorizer.add_user(user, password, str(root), perm="elradfmwMT")
        handler = type(
            "Handler",
            (FTPHandler,),
            # no 3 s pause after a refused login: the test refuses one on purpose
            {"authorizer": authorizer, "auth_failed_timeout": 0, "log_prefix": ""},
        )
        self.server = ThreadedFTPServer(("127.0.0.1", 0), handler)
        self.port = int(self.server.socket.getsockname()[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, password: str | None) -> str:
        login = self.user if password is None else f"{self.user}:{password}"
        return f"ftp://{login}@127.0.0.1:{self.port}/store"

    def close(self) -> None:
        self.server.close_all()
        self._thread.join(timeout=10)


@pytest.fixture
def ftp_server(tmp_path: Path) -> Iterator[_FtpServer]:
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    root = tmp_path / "ftp-root"
    root.mkdir()
    server = _FtpServer(root, "alice", STORE_PASSWORD)
    yield server
    server.close()


@pytest.mark.slow
def test_a_store_password_is_used_never_kept_and_asked_for_by_name(
    make_shell: Callable[..., Any], ftp_server: _FtpServer, tmp_path: Path
) -> None:
    """A session on a real FTP server whose store URL carries its password: every command
    works with it; tlreg.toml (0600), the registry (meta, checkpoints, a Run's config), the
    objects and every output hold none of it; a command given the URL
    without it (from tlreg.toml) refuses in one line naming where to put it, and works once
    it is there (fsspec's FSSPEC_FTP_PASSWORD)."""
    registry_url = f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    shell = make_shell(registry_url, ftp_server.url(STORE_PASSWORD))
    printed: list[str] = []
    weights = tmp_path / "ancestor.safetensors"
    save_file({k: v.contiguous() for k, v in lower.build_model(3).state_dict().items()}, weights)

    out = shell.tlreg("init")
    printed.append(out)
    shown = ftp_server.url(None)
    assert f"  store     {shown}\n" in out
    assert "the store password was not saved: set FSSPEC_FTP_PASSWORD" in out
    toml = shell.home / "tlreg.toml"
    assert f'store_url = "{shown}"' in toml.read_text()
    assert stat.S_IMODE(toml.stat().st_mode) == 0o600
    printed.append(shell.tlreg("init", "--json"))  # again: the same store, recorded without it
    assert json.loads(printed[-1])["store_url"] == shown

    printed.append(shell.tlreg("import", str(weights), "--name", "base"))
    printed.append(
        shell.tlreg("branch", "head", "base", "--task", "tlreg.training.examples.digits:upper")
    )
    # a Run as `tlreg train` records it (the Ray session's files are searched by the test
    # above: the store URL reaches the workers the way the registry URL does)
    config = TrainConfig(
        branch="head", task="tlreg.training.examples.digits:upper",
        registry_url=registry_url, store_url=shell.store_url,
    )  # fmt: skip
    with Registry(registry_url) as registry:
        registry.start_run("head", recorded_config(config))
    for args in (
        ("verify", "head"),
        ("show", "head", "--json"),
        ("runs", "--json"),
        ("export", "head", str(tmp_path / "out.safetensors")),
        ("gc", "--dry-run"),
    ):
        printed.append(shell.tlreg(*args))
    runs = json.loads(printed[-3])
    assert [r["config"]["store_url"] for r in runs] == [ftp_server.url("***")]

    # the next shell has only tlreg.toml: the URL without its password
    del shell.env["TLREG_STORE_URL"]
    refused = CliRunner(env={"TLREG_STORE_URL": None, **shell.env}).invoke(cli, ["verify", "head"])
    printed.append(refused.output)
    assert refused.exit_code == 1, refused.output
    assert refused.output.count("\n") == 1 and refused.output.startswith("Error: ")
    assert f"cannot open store {shown} (" in refused.output
    assert "set FSSPEC_FTP_PASSWORD or pass the URL with its password again" in refused.output
    shell.env["FSSPEC_FTP_PASSWORD"] = STORE_PASSWORD
    printed.append(shell.run("verify", "head"))
    del shell.env["FSSPEC_FTP_PASSWORD"]

    # a store shipped elsewhere (Ray pickles stores) carries the URL without the password
    store = open_store(ftp_server.url(STORE_PASSWORD))
    assert next(iter(store.list("manifests")), None) is not None  # it reads, here
    shipped = pickle.dumps(store)
    assert STORE_PASSWORD.encode() not in shipped
    with pytest.raises(StoreError, match="set FSSPEC_FTP_PASSWORD"):
        pickle.loads(shipped)

    with Registry(registry_url) as registry:
        assert registry.get_meta("store_url") == shown
    artifacts = list(_files(ftp_server.root)) + list(_files(shell.home))
    assert any("manifests" in name for name, _ in artifacts)
    assert any(name.endswith("registry.db") for name, _ in artifacts)
    artifacts += [(f"output {i}", text.encode()) for i, text in enumerate(printed)]
    found = [name for name, data in artifacts if STORE_PASSWORD.encode() in data]
    assert found == []
    assert len(artifacts) > 15


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://alice@127.0.0.1/store", True),
        ("simplecache::ftp://alice@127.0.0.1/store", True),
        (f"ftp://alice:{STORE_PASSWORD}@127.0.0.1/store", False),
        ("ftp://127.0.0.1/store", False),
        ("/data/store", False),
    ],
)
def test_a_login_without_password_is_told_apart(url: str, expected: bool) -> None:
    from tlreg.storage_backends.credentials import has_login_without_password

    assert has_login_without_password(url) is expected


def test_a_library_message_quoting_the_url_is_scrubbed() -> None:
    from tlreg.storage_backends.credentials import scrub

    url = f"ftp://alice:{STORE_PASSWORD.replace('-', '%2D')}@h/x?token=tok-PLANTED"
    message = f"530 login failed for {url} (password {STORE_PASSWORD}, token tok-PLANTED)"
    assert scrub(message, url) == (
        "530 login failed for ftp://alice:***@h/x?token=*** (password ***, token ***)"
    )
