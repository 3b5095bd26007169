"""Credentials are never store options (the one list of option names that carry a secret),
and never written down or shown (the one URL-redaction helper, :func:`without_password`).

A store pickles its options (Ray ships stores to workers), so an option that holds a secret
would travel with every pickled store. Secrets come from the provider's environment or
config files instead (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, ``AZURE_STORAGE_*``,
``~/.ssh/config``), read again wherever the store is opened. Every backend refuses the same
names: :class:`~tlreg.storage_backends.s3.S3Store` and
:class:`~tlreg.storage_backends.fsspec_store.FsspecStore` both call :func:`secret_options`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

SECRET_OPTIONS = frozenset(
    {
        "key",  # s3fs: the access key id
        "session",  # s3fs: a botocore session, which holds resolved credentials
        "account_key",  # adlfs
        "connection_string",  # adlfs
        "private_key",  # sftp (paramiko)
        "pkey",  # sftp (paramiko)
        "auth",  # http, webdav
    }
)
"""Option names (fsspec backends' own: s3fs, gcsfs, adlfs, ossfs, sftp/ftp/smb, webdav, ...)
that hold a secret, besides those containing a :data:`SECRET_WORDS` word or starting with
``aws_``."""

S3_SECRET_OPTIONS = SECRET_OPTIONS | {"username"}
"""For S3 also ``username``: s3fs's alias of ``key``. Elsewhere (sftp, ftp, smb, webdav) a
user name is a login, not a secret."""

SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "sas")
"""An option whose name contains one of these holds a secret (``secret``, ``token``,
``password``, ``client_secret``, ``sas_token``, ...)."""


def is_secret_option(name: str, *, s3: bool = False) -> bool:
    """Whether an option called ``name`` would hold a secret (``s3``: of an S3 store)."""
    leaf = name.lower()
    return (
        leaf in (S3_SECRET_OPTIONS if s3 else SECRET_OPTIONS)
        or leaf.startswith("aws_")
        or any(word in leaf for word in SECRET_WORDS)
    )


def secret_options(options: Mapping[str, Any], *, s3: bool = False) -> list[str]:
    """The names among ``options`` (and their ``client_kwargs``, as
    ``client_kwargs.NAME``) that would hold a secret, sorted."""
    names = list(options) + [f"client_kwargs.{k}" for k in options.get("client_kwargs") or {}]
    return sorted(name for name in names if is_secret_option(name.rsplit(".", 1)[-1], s3=s3))


_LOGIN_WITH_PASSWORD = re.compile(r"(//[^/?#@:]*):[^/?#]*@")


def without_password(url: str, *, mask: bool = False) -> str:
    """``url`` with its password removed, or with ``mask`` replaced by ``***``: what may be
    written down, shown or sent. A URL that holds no password is returned unchanged.

    Only the ``//user:password@`` part changes: the rest of the URL stays as written (a
    store path keeps its ``%20`` and ``%2F``). A password that pattern does not find but
    SQLAlchemy would send (one holding a ``/``) is found by SQLAlchemy's reading, the one the
    registry connects with. Never raises. Passwords belong in the environment
    (``PGPASSWORD``, ``~/.pgpass``, the object store provider's variables and config files).
    """
    login = _LOGIN_WITH_PASSWORD.search(url)
    if login is not None:
        kept = f"{login.group(1)}:***@" if mask else f"{login.group(1)}@"
        return url[: login.start()] + kept + url[login.end() :]
    from sqlalchemy.engine import make_url  # imported here: stores need no SQLAlchemy
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads (e.g. a bad port)
        return url
    if parsed.password is None:
        return url
    if mask:
        return parsed.render_as_string(hide_password=True)
    return parsed._replace(password=None).render_as_string(hide_password=False)
