"""What is checked before a run starts Ray: everything that can be.

Starting Ray and a worker group takes 10-40 s; a run that then fails on a mistake the driver
could have seen (a branch already at the target step, a misspelled ``--freeze`` glob, a store
it cannot write, a branch another run is training) wastes that time and, worse, may
"succeed" having kept nothing. :func:`preflight` checks each of them in the driver, in
order of cost, and raises a one-line error naming the object and the next step.

:func:`remembered_options` is the other half of a resume: the options the branch's head was
trained with (from the Run that committed it), which a resume reuses.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tlreg.registry import CheckpointRecord, Registry
from tlreg.registry.leases import leased_error
from tlreg.storage_backends import StoreError, open_store
from tlreg.storage_backends.credentials import without_password
from tlreg.training.config import TrainConfig, absolute_store_url
from tlreg.training.errors import ConfigError
from tlreg.training.freeze import matches_any
from tlreg.training.task import Task, load_task

REMEMBERED = (
    "freeze",
    "lr",
    "backbone_lr_mult",
    "batch_size",
    "seed",
    "checkpoint_every",
    "eval_every",
    "lazy",
    "workers",
    "max_failures",
    "on_checkpoint_error",
)
"""The :class:`TrainConfig` options a resume takes from the run that committed the branch's
head, unless given again. ``steps`` is the target, not a habit, and is never reused."""


@dataclass(frozen=True, slots=True)
class Checked:
    """What :func:`preflight` found."""

    task: Task
    head: CheckpointRecord | None
    """The branch's head checkpoint (None on an empty branch)."""
    resumed: bool
    """True when the head was committed on this branch (a resume, not a transfer)."""


def preflight(config: TrainConfig, registry: Registry, *, probe_store: bool = True) -> Checked:
    """Check ``config`` against the registry, the task and the store before Ray starts.

    Raises TaskNotFound, BranchNotFound, BranchLeased (another run trains the branch),
    ConfigError (target step already reached; a ``--freeze`` glob that matches no parameter;
    the store or the local tier cannot be written; a local tier on a network filesystem or
    overlapping the store) or StoreError.
    """
    task = load_task(config.task)
    branch = registry.get_branch(config.branch)
    live = registry.lease(config.branch)
    if live is not None:
        raise leased_error(live)
    head = registry.resolve(branch.head) if branch.head else None
    resumed = head is not None and head.branch == config.branch
    if head is not None and resumed and head.step >= config.steps:
        raise ConfigError(
            f"branch {config.branch!r} is already at step {head.step} (head {head.id[:12]}), "
            f"at or past --steps {config.steps}: pass --steps above {head.step} to train further "
            "(--steps counts to a total)"
        )
    if config.freeze:
        check_freeze_globs(config, task)
    if probe_store:  # (not for `tlreg submit`: the cluster's nodes have their own disks)
        if config.local_tier is not None:
            check_local_tier(config.local_tier, config.store_url)
        check_store_writable(config.store_url)
    return Checked(task=task, head=head, resumed=resumed)


def check_freeze_globs(config: TrainConfig, task: Task) -> None:
    """Refuse a ``--freeze`` glob that matches no parameter of the task's model (a typo would
    otherwise train the whole model silently)."""
    names = [name for name, _ in task.build_model(config.seed).named_parameters()]
    for glob in config.freeze:
        if not any(matches_any(name, (glob,)) for name in names):
            tops = sorted({name.split(".")[0] for name in names})
            raise ConfigError(
                f"--freeze {glob!r} matches no parameter of {config.task}'s model; its "
                f"parameters start with {', '.join(repr(t + '.') for t in tops[:8])} "
                "(globs match whole names, e.g. 'features.*')"
            )


def check_store_writable(store_url: str) -> None:
    """Write and delete a small probe object: a read-only store (a permission, a read-only
    mount, S3 credentials without PutObject) is refused now, not at the first checkpoint."""
    key = f"probes/{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"
    shown = without_password(store_url, mask=True)
    try:
        store = open_store(store_url)
        try:
            store.put(key, b"tlreg write probe\n")
            store.delete(key)
        finally:
            store.close()
    except (StoreError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"store {shown} is not writable ({first}): training could keep no checkpoint; "
            "fix its permissions or pass another --store"
        ) from None


NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "fuse.ceph",
        "fuse.sshfs",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.glusterfs",
        "glusterfs",
        "9p",
        "afs",
        "ncpfs",
        "panfs",
        "orangefs",
        "pvfs2",
        "wekafs",
    }
)
"""Filesystem types (``/proc/self/mounts``) that are not node-local: a tier there would be
as far away as the shared store, and shared by every node."""


def _unescape_mount(field: str) -> str:
    # /proc/self/mounts escapes space, tab, newline and backslash as octal (\040, ...)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_of(path: str, mounts: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) of the mount holding ``path`` (an existing, resolved
    path), from ``mounts`` (the text of a mounts table; default: ``/proc/self/mounts``)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return "/", "unknown"
    best = ("/", "unknown")
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point, fstype = _unescape_mount(fields[1]), fields[2]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):  # the last of equal points is on top
            best = (point, fstype)
    return best


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_local_tier(tier: str, store_url: str, *, mounts: str | None = None) -> None:
    """Refuse a local tier that cannot be one: on a network filesystem (``mounts``: the text
    of a mounts table, default ``/proc/self/mounts``), not writable, or overlapping a local
    store. ``{node}`` is expanded with this machine's name; nothing is created or left."""
    from tlreg.ckpt.tiers import expand_tier

    path = Path(expand_tier(tier, socket.gethostname())).absolute()
    existing = _nearest_existing(path)
    resolved = existing.resolve()
    point, fstype = mount_of(str(resolved), mounts)
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("nfs"):
        raise ConfigError(
            f"local tier {tier!r} is on a network filesystem ({fstype} mounted at {point}), "
            "not on this node's own disk: pass a --local-tier on local disk (NVMe, RAM disk, "
            "/tmp), or leave it out to write straight to the store"
        )
    scheme = urlsplit(store_url).scheme if "://" in store_url else ""
    if scheme in ("", "file"):
        store = Path(absolute_store_url(store_url)).resolve()
        target = resolved / path.relative_to(existing)
        if target == store or store in target.parents or target in store.parents:
            raise ConfigError(
                f"local tier {tier!r} overlaps the store {str(store)!r}: the tier must be a "
                "directory of its own on node-local disk (pass another --local-tier)"
            )
    if not existing.is_dir():
        raise ConfigError(
            f"local tier {tier!r} is not writable ({existing} is not a directory): "
            "pass a --local-tier under a writable directory"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".tlreg-tier-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(
            f"local tier {tier!r} is not writable ({existing}: {e.strerror or e}): "
            "fix its permissions or pass another --local-tier"
        ) from None


def remembered_options(registry: Registry, branch: str) -> tuple[int | None, dict[str, Any]]:
    """(run id, options) of the run that committed ``branch``'s head on this branch, limited
    to :data:`REMEMBERED`; (None, {}) when the head is a transfer base, or the branch is
    empty, or the head was committed by no recorded run."""
    head_id = registry.get_branch(branch).head
    if head_id is None:
        return None, {}
    head = registry.resolve(head_id)
    if head.branch != branch or head.run_id is None:
        return None, {}
    runs = [r for r in registry.runs(branch) if r.id == head.run_id]
    if not runs:
        return None, {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    stored = runs[0].config
    options = {k: stored[k] for k in REMEMBERED if k in stored and k in known}
    if "freeze" in options:
        options["freeze"] = tuple(options["freeze"])
    return head.run_id, options
