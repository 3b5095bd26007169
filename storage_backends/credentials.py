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
        "username",  # s3fs: an alias of key
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

SECRET_WORDS = ("secret", "password", "passwd", "token", "credential", "sas")
"""An option whose name contains one of these holds a secret (``secret``, ``token``,
``password``, ``client_secret``, ``sas_token``, ...)."""


def is_secret_option(name: str) -> bool:
    """Whether an option called ``name`` would hold a secret."""
    leaf = name.lower()
    return (
        leaf in SECRET_OPTIONS
        or leaf.startswith("aws_")
        or any(word in leaf for word in SECRET_WORDS)
    )


def secret_options(options: Mapping[str, Any]) -> list[str]:
    """The names among ``options`` (and their ``client_kwargs``, as
    ``client_kwargs.NAME``) that would hold a secret, sorted."""
    names = list(options) + [f"client_kwargs.{k}" for k in options.get("client_kwargs") or {}]
    return sorted(name for name in names if is_secret_option(name.rsplit(".", 1)[-1]))


_LOGIN_WITH_PASSWORD = re.compile(r"(//[^/?#@:]*):[^/?#]*@")


def without_password(url: str, *, mask: bool = False) -> str:
    """``url`` with its password removed, or with ``mask`` replaced by ``***``: what may be
    written down, shown or sent. A URL that holds no password is returned unchanged.

    The URL is read as SQLAlchemy reads it (the registry connects with that reading, so the
    password found is the one it would send), or, when SQLAlchemy cannot read it, by the
    ``//user:password@`` pattern alone. Passwords belong in the environment (``PGPASSWORD``,
    ``~/.pgpass``, the object store provider's variables and config files).
    """
    from sqlalchemy.engine import make_url  # imported here: stores need no SQLAlchemy
    from sqlalchemy.exc import ArgumentError

    hidden = "***" if mask else None
    try:
        parsed = make_url(url)
    except ArgumentError:
        # not a URL SQLAlchemy reads (a store URL, or a mistyped one): "//user:password@"
        return _LOGIN_WITH_PASSWORD.sub(r"\1@" if hidden is None else rf"\1:{hidden}@", url)
    if parsed.password is None:
        return url
    if mask:
        return parsed.render_as_string(hide_password=True)
    return parsed._replace(password=None).render_as_string(hide_password=False)
