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
from urllib.parse import unquote, urlsplit

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

_SECRET_QUERY = frozenset({"sig", "signature", "x-amz-signature", "x-goog-signature", "key"})
"""Query parameters that hold a secret besides those :func:`is_secret_option` names (the
signatures of presigned and SAS URLs, API keys)."""

_QUERY_PARAM = re.compile(r"[?&;]([^=&;#]*)=([^&;#]*)")


def _secret_param(name: str) -> bool:
    leaf = name.lower()
    return leaf in _SECRET_QUERY or is_secret_option(leaf)


def without_password(url: str, *, mask: bool = False) -> str:
    """``url`` with its secrets removed, or with ``mask`` replaced by ``***``: what may be
    written down, shown or sent. A URL that holds no secret is returned unchanged.

    The secrets are the password of every ``//user:password@`` login (each URL of an
    fsspec chain ``a::b``) and the value of every query parameter that holds one
    (``password=``, ``sas_token=``, ``X-Amz-Signature=``, ``sig=``, ... : see
    :func:`is_secret_option`): removed, such a parameter is dropped whole. Only those parts
    change: the rest of the URL stays as written (a store path keeps its ``%20`` and
    ``%2F``). A password that pattern does not find but SQLAlchemy would send (one holding a
    ``/``) is found by SQLAlchemy's reading, the one the registry connects with. Never
    raises. Passwords belong in the environment (``PGPASSWORD``, ``~/.pgpass``, the object
    store provider's variables and config files, fsspec's ``FSSPEC_<PROTOCOL>_PASSWORD``).
    """
    kept = _LOGIN_WITH_PASSWORD.sub(
        lambda m: f"{m.group(1)}:***@" if mask else f"{m.group(1)}@", url
    )
    kept = _without_secret_params(kept, mask=mask)
    if kept != url or "@" not in url:  # SQLAlchemy's reading can only add a login's password
        return kept
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


def _without_secret_params(url: str, *, mask: bool) -> str:
    head, hash_, fragment = url.partition("#")
    base, question, query = head.partition("?")
    if not question:
        return url
    params = re.split(r"([&;])", query)  # names and values, with their separators
    changed = False
    for i in range(0, len(params), 2):
        name, equals, _value = params[i].partition("=")
        if equals and _secret_param(unquote(name)):
            params[i] = f"{name}=***" if mask else ""
            changed = True
    if not changed:
        return url
    if not mask:
        kept = [p for p in params[::2] if p]
        return base + (f"?{'&'.join(kept)}" if kept else "") + hash_ + fragment
    return f"{base}?{''.join(params)}{hash_}{fragment}"


def url_secrets(url: str) -> list[str]:
    """The secret strings ``url`` holds (passwords and secret query values, as written and
    percent-decoded), longest first: what a message quoting a library's error must not show
    (see :func:`scrub`)."""
    found: list[str] = []
    for m in _LOGIN_WITH_PASSWORD.finditer(url):
        password = url[m.end(1) + 1 : m.end() - 1]
        found += [password, unquote(password)]
    head = url.partition("#")[0]
    for m in _QUERY_PARAM.finditer(head):
        if _secret_param(unquote(m.group(1))) and m.group(2):
            found += [m.group(2), unquote(m.group(2))]
    if not found and "@" in url:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            read = make_url(url).password
        except (ArgumentError, ValueError):
            read = None
        if read is not None:
            found.append(str(read))
    return sorted({s for s in found if s}, key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (e.g. a library's error message about ``url``) with every secret of ``url``
    replaced by ``***``."""
    for secret in url_secrets(url):
        text = text.replace(secret, "***")
    return text


def has_login_without_password(url: str) -> bool:
    """Whether ``url`` names a user (``scheme://user@host``) but no password: a URL as
    tlreg writes it down, whose password has to come from somewhere else."""
    for part in url.split("::"):  # each URL of an fsspec chain
        netloc = urlsplit(part).netloc if "://" in part else ""
        user, at, _ = netloc.rpartition("@")
        if at and user and ":" not in user:
            return True
    return False
