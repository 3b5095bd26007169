"""Where the registry and the store live.

Precedence, highest first: explicit arguments (CLI flags), environment (``TLREG_HOME``,
``TLREG_REGISTRY_URL``, ``TLREG_STORE_URL``), ``$TLREG_HOME/tlreg.toml``, then the embedded
defaults: a SQLite registry and a store directory inside ``TLREG_HOME`` (``~/.tlreg``).
Credentials never go here: stores read them from the environment or the provider's config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import tomllib
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from tlreg.training.errors import ConfigError

CONFIG_FILE = "tlreg.toml"


@dataclass(kw_only=True, slots=True, frozen=True)
class Settings:
    """Resolved locations of one tlreg installation."""

    home: Path
    """Directory holding tlreg.toml and, by default, the registry and the store."""
    registry_url: str
    """SQLAlchemy URL: ``sqlite:///path.db`` or ``postgresql+psycopg://...``."""
    store_url: str
    """Path or URL of the object store (file path, file://, s3://bucket/prefix, ...)."""

    def __post_init__(self) -> None:
        # A relative sqlite path would silently depend on the working directory of each
        # Ray worker; require the absolute form.
        if self.registry_url.startswith("sqlite:///") and not self.registry_url.startswith(
            "sqlite:////"
        ):
            raise ConfigError(
                f"registry URL {self.registry_url!r} is relative: use sqlite:////absolute/path.db"
            )


def default_home() -> Path:
    """``$TLREG_HOME`` or ``~/.tlreg``."""
    return Path(os.environ.get("TLREG_HOME") or "~/.tlreg").expanduser().absolute()


def _read_toml(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}): fix or delete it") from None
    section = data.get("tlreg", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tlreg] must be a table")
    unknown = set(section) - {"registry_url", "store_url"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} in [tlreg]")
    return {k: str(v) for k, v in section.items()}


def load_settings(
    *,
    home: str | os.PathLike[str] | None = None,
    registry_url: str | None = None,
    store_url: str | None = None,
) -> Settings:
    """Resolve the settings with the precedence described in the module docstring.

    An argument given as "" is taken as given (and refused when opened), not as absent: an
    empty ``--store "$UNSET_VAR"`` must not silently fall back to the default store. Empty
    environment variables count as unset, as usual.
    """
    home_path = Path(home).expanduser().absolute() if home else default_home()
    file_values = _read_toml(home_path / CONFIG_FILE)
    registry = (
        registry_url
        if registry_url is not None
        else os.environ.get("TLREG_REGISTRY_URL")
        or file_values.get("registry_url")
        or f"sqlite:///{home_path / 'registry.db'}"
    )
    store = (
        store_url
        if store_url is not None
        else os.environ.get("TLREG_STORE_URL")
        or file_values.get("store_url")
        or str(home_path / "store")
    )
    return Settings(home=home_path, registry_url=registry, store_url=store)


def without_password(url: str) -> str:
    """``url`` with any password removed (not masked): what may be written down or shown.
    Database passwords come from the environment (``PGPASSWORD``) or ``~/.pgpass``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.password is None:
        return url
    return parsed._replace(password=None).render_as_string(hide_password=False)


def write_settings(settings: Settings) -> Path:
    """Write ``tlreg.toml`` in ``settings.home`` (creating it) and return its path.

    A password in the registry URL is left out: files hold no credentials (give it through
    ``PGPASSWORD`` or ``~/.pgpass``, which the PostgreSQL driver reads itself).
    """
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / CONFIG_FILE
    body = (
        "# Written by `tlreg init`. Environment variables and flags override these.\n"
        "[tlreg]\n"
        f"registry_url = {_toml_str(without_password(settings.registry_url))}\n"
        f"store_url = {_toml_str(settings.store_url)}\n"
    )
    partial = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    try:
        partial.write_text(body)
        partial.replace(path)  # atomic: a reader sees the old file or the new one, never half
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
