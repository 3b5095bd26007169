"""Where the registry and the store live, and what one training run does.

Settings precedence, highest first: explicit arguments (CLI flags), environment (``TLREG_HOME``,
``TLREG_REGISTRY_URL``, ``TLREG_STORE_URL``, ``TLREG_LOCAL_TIER``), ``$TLREG_HOME/tlreg.toml``,
then the embedded defaults: a SQLite registry and a store directory inside ``TLREG_HOME``
(``~/.tlreg``), and no node-local tier.
Credentials never go here: stores read them from the environment or the provider's config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import tomllib

from tlreg.storage_backends.credentials import without_password
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
    local_tier: str | None = None
    """Node-local directory in front of the store (``{node}`` expands to the node id), or
    None: every checkpoint goes straight to the store."""

    def __post_init__(self) -> None:
        # A relative sqlite path would silently depend on the working directory of each
        # Ray worker; require the absolute form.
        if self.registry_url.startswith("sqlite:///") and not self.registry_url.startswith(
            "sqlite:////"
        ):
            raise ConfigError(
                f"registry URL {self.registry_url!r} is relative: use sqlite:////absolute/path.db"
            )


def absolute_store_url(url: str, *, relative_to: Path | None = None) -> str:
    """``url`` with a relative local path (``./rel``, ``rel``, ``file://rel``) made absolute
    against ``relative_to`` (default: the working directory); other URLs are returned as given.

    A relative store saved as given would resolve against each later command's working
    directory (and each Ray worker's), so that one registry would point at many stores.
    """
    if not url:
        return url
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in ("", "file"):
        return url
    path = url[len("file://") :] if scheme == "file" else url
    expanded = Path(path).expanduser()
    base = relative_to if relative_to is not None else Path.cwd()
    # one spelling per folder: no "~", "file://", trailing "/" or "." left to compare
    return os.path.normpath(expanded if expanded.is_absolute() else base / expanded)


def same_store(a: str, b: str) -> bool:
    """Whether store URLs ``a`` and ``b`` name the same store (passwords aside; local paths
    compared in the one spelling :func:`absolute_store_url` gives them)."""
    return absolute_store_url(without_password(a)) == absolute_store_url(without_password(b))


def check_home_store(url: str) -> None:
    """Refuse a store URL that cannot be a home's permanent store (``memory://``: it lives only
    as long as one process, so every later command would see an empty store)."""
    if "memory://" in url:  # also inside an fsspec chain (simplecache::memory://x)
        raise ConfigError(
            f"store {url!r} lives only in this process's memory and cannot be a home's store: "
            "pass a directory path or a URL like s3://bucket/prefix"
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
    unknown = set(section) - {"registry_url", "store_url", "local_tier"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} in [tlreg]")
    return {k: str(v) for k, v in section.items()}


def load_settings(
    *,
    home: str | os.PathLike[str] | None = None,
    registry_url: str | None = None,
    store_url: str | None = None,
    local_tier: str | None = None,
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
    if store_url is not None:
        store = absolute_store_url(store_url)
    elif os.environ.get("TLREG_STORE_URL"):
        store = absolute_store_url(os.environ["TLREG_STORE_URL"])
    elif file_values.get("store_url"):
        # a relative path written by hand in tlreg.toml is relative to the home, like git's
        store = absolute_store_url(file_values["store_url"], relative_to=home_path)
    else:
        store = str(home_path / "store")
    tier = (
        local_tier
        if local_tier is not None
        else os.environ.get("TLREG_LOCAL_TIER") or file_values.get("local_tier")
    )
    return Settings(
        home=home_path,
        registry_url=registry,
        store_url=store,
        local_tier=absolute_tier(tier) if tier else None,
    )


def absolute_tier(path: str) -> str:
    """A local tier path made absolute (``~`` expanded; ``{node}`` kept as written): each Ray
    worker expands it on its own node, whatever its working directory."""
    expanded = os.path.expanduser(path)
    return os.path.normpath(expanded if os.path.isabs(expanded) else os.path.abspath(expanded))


def write_settings(settings: Settings) -> Path:
    """Write ``tlreg.toml`` in ``settings.home`` (creating it) and return its path.

    Passwords in the registry and store URLs are left out: files hold no credentials (give
    the registry's through ``PGPASSWORD`` or ``~/.pgpass``, which the PostgreSQL driver reads
    itself; a store's through its provider's environment or fsspec's
    ``FSSPEC_<PROTOCOL>_PASSWORD``). The file is created readable by its owner only (0600),
    as it names where the data lives. A relative
    store path is written absolute; a ``memory://`` store is refused (ConfigError).
    """
    check_home_store(settings.store_url)
    store_url = absolute_store_url(settings.store_url)
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / CONFIG_FILE
    body = (
        "# Written by `tlreg init`. Environment variables and flags override these.\n"
        "[tlreg]\n"
        f"registry_url = {_toml_str(without_password(settings.registry_url))}\n"
        f"store_url = {_toml_str(without_password(store_url))}\n"
    )
    if settings.local_tier:
        body += f"local_tier = {_toml_str(settings.local_tier)}\n"
    partial = path.with_name(f".{CONFIG_FILE}.{os.getpid()}.tmp")
    try:
        partial.unlink(missing_ok=True)  # a stale one would keep its mode
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body)
        partial.replace(path)  # atomic: a reader sees the old file or the new one, never half
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """One training run of one branch; everything a worker needs, JSON-serialisable.

    Its defaults are ``tlreg train``'s: the command's options take them from here.
    """

    branch: str
    """Registry branch to restore from and commit to."""
    task: str
    """``MODULE:ATTR`` naming a :class:`~tlreg.training.task.Task`."""
    registry_url: str
    """Registry every worker commits to (rank 0) and reads from."""
    store_url: str
    """Object store every worker reads from and writes to."""
    workers: int = 2
    """Ray Train workers (DDP ranks, gloo on CPU)."""
    steps: int = 200
    """Train until this branch step (a resumed run continues from its last checkpoint)."""
    checkpoint_every: int = 50
    """Checkpoint every N steps, and at the last step."""
    eval_every: int = 10
    """Evaluate the validation metric every N steps (rank 0)."""
    freeze: tuple[str, ...] = ()
    """Globs of parameter names that do not train (feature extraction)."""
    lr: float = 1e-3
    """Adam learning rate."""
    backbone_lr_mult: float = 1.0
    """Learning-rate multiplier for the backbone: every trainable parameter outside the
    task's ``reset`` globs (full fine-tuning with a gentler backbone, e.g. 0.1)."""
    batch_size: int = 32
    """Examples per rank per step."""
    seed: int = 0
    """Seed for model initialisation and batch order."""
    lazy: bool = False
    """Lazy checkpoint staging (the copy overlaps the next forward/backward)."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may do; each resumes from the last commit."""
    on_checkpoint_error: str = "stop"
    """What a checkpoint that fails to commit does: "stop" the run (it fails, with the
    cause) or "continue" training (each failure is reported when it happens)."""
    local_tier: str | None = None
    """Node-local directory in front of the store (``{node}``: the Ray node id); None: none."""
    persist_every: int | None = None
    """With a local tier: drain every M-th step's checkpoint to the store (M a multiple of
    ``checkpoint_every``); None: every checkpoint is drained."""
    local_keep: int = 2
    """With a local tier: local-only checkpoints kept on it once a newer one is shared."""
    drain_bytes_per_s: float | None = None
    """With a local tier: each node's drainer copies at most this many bytes/s (None: no cap)."""

    def __post_init__(self) -> None:
        # Each rule is checked here once so that workers never start with a bad config.
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {self.steps}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every must be >= 1, got {self.eval_every}")
        if self.backbone_lr_mult < 0:
            raise ConfigError(f"--backbone-lr-mult must be >= 0, got {self.backbone_lr_mult}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.on_checkpoint_error not in ("stop", "continue"):
            raise ConfigError(
                f"--on-checkpoint-error must be 'stop' or 'continue', "
                f"got {self.on_checkpoint_error!r}"
            )
        if self.persist_every is not None:
            if self.local_tier is None:
                raise ConfigError(
                    f"--persist-every {self.persist_every} needs a local tier (every checkpoint "
                    "goes to the store without one): pass --local-tier PATH or drop --persist-every"
                )
            if self.persist_every < 1 or self.persist_every % self.checkpoint_every:
                raise ConfigError(
                    f"--persist-every {self.persist_every} is not a multiple of "
                    f"--checkpoint-every {self.checkpoint_every}: pass e.g. --persist-every "
                    f"{self.checkpoint_every * max(1, self.persist_every // self.checkpoint_every)}"
                )
        if self.local_keep < 1:
            raise ConfigError(f"--local-keep must be >= 1, got {self.local_keep}")
        if self.drain_bytes_per_s is not None and self.drain_bytes_per_s <= 0:
            raise ConfigError(
                f"--drain-bytes-per-s must be > 0, got {self.drain_bytes_per_s} "
                "(leave it out for no cap)"
            )
        self.freeze = tuple(self.freeze)

    def persists(self, step: int) -> bool:
        """Whether the checkpoint at ``step`` goes on to the shared store (always without a
        local tier; with one, every ``persist_every``-th step and the last)."""
        if self.local_tier is None or self.persist_every is None:
            return True
        return step % self.persist_every == 0 or step == self.steps
