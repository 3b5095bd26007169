"""Local tiers that cannot be one, and tier options that do not fit together (issue 16): one
line naming the tier or option and the next step, exit 1, before Ray starts, nothing changed.

Ray never starts here: ``_ensure_ray`` is replaced by one that fails the test, so a refusal
that came after Ray would show up as that failure. A network filesystem cannot be mounted on
this machine (no NFS/CIFS server), so that check reads a mounts table given as text, in
``/proc/self/mounts``'s own format; the read-only tier is a real read-only bind mount.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tlreg.training.driver as driver
from tlreg.training.errors import ConfigError
from tlreg.training.preflight import NETWORK_FILESYSTEMS, check_local_tier, mount_of

LOWER = "tlreg.training.examples.digits:lower"


@pytest.fixture(autouse=True)
def no_tier_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TLREG_LOCAL_TIER", raising=False)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def ray_started(num_cpus: int) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(driver, "_ensure_ray", ray_started)


@pytest.fixture
def base(tlreg: Callable[..., Any], home: Path) -> None:
    assert tlreg("init").exit_code == 0
    assert tlreg("branch", "base", "--task", LOWER).exit_code == 0


def _one_line_error(result: Any, *needles: str) -> str:
    out: str = result.output
    assert result.exit_code == 1, out
    assert out.startswith("Error: ") and out.count("\n") == 1, out
    for needle in needles:
        assert needle in out, out
    return out


def _train(tlreg: Callable[..., Any], *args: str) -> Any:
    return tlreg("train", "base", "--steps", "4", "--checkpoint-every", "2", *args)


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
{server}:/export {point} {fstype} rw,relatime 0 0
tmpfs {point}/ram tmpfs rw,nosuid,nodev 0 0
"""


@pytest.mark.parametrize("fstype", ["nfs4", "nfs", "cifs", "lustre", "gpfs", "fuse.sshfs", "9p"])
def test_a_local_tier_on_a_network_filesystem_is_refused_naming_the_mount(
    tmp_path: Path, fstype: str
) -> None:
    (tmp_path / "net").mkdir()
    point = str((tmp_path / "net").resolve())
    mounts = MOUNTS.format(server="filer", point=point, fstype=fstype)
    tier = f"{point}/tlreg/{{node}}"
    with pytest.raises(ConfigError) as refused:
        check_local_tier(tier, str(tmp_path / "store"), mounts=mounts)
    message = str(refused.value)
    assert message == (
        f"local tier {tier!r} is on a network filesystem ({fstype} mounted at {point}), not on "
        "this node's own disk: pass a --local-tier on local disk (NVMe, RAM disk, /tmp), or "
        "leave it out to write straight to the store"
    )
    assert "\n" not in message
    # a local mount inside the network one is the tier's own disk: accepted
    (tmp_path / "net" / "ram").mkdir()
    check_local_tier(f"{point}/ram/{{node}}", str(tmp_path / "store"), mounts=mounts)
    assert sorted(p.name for p in (tmp_path / "net" / "ram").iterdir()) == []


def test_the_mount_of_a_path_is_the_longest_mount_point_holding_it() -> None:
    table = (
        "a / ext4 rw 0 0\nb /data nfs4 rw 0 0\nc /data2 xfs rw 0 0\nd /mnt/my\\040disk xfs rw 0 0\n"
    )
    assert mount_of("/data/x", table) == ("/data", "nfs4")
    assert mount_of("/data", table) == ("/data", "nfs4")
    assert mount_of("/data2/x", table) == ("/data2", "xfs")  # not inside /data
    assert mount_of("/tmp/x", table) == ("/", "ext4")
    assert mount_of("/mnt/my disk/t", table) == ("/mnt/my disk", "xfs")  # \040 is a space
    network = {"nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph"}
    assert network <= NETWORK_FILESYSTEMS


def test_a_local_tier_under_a_file_is_refused_before_ray_and_nothing_changes(
    tlreg: Callable[..., Any], base: None, no_ray: None, snapshot: Callable, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    before = snapshot()
    tier = f"{blocker}/tier/{{node}}"
    _one_line_error(
        _train(tlreg, "--local-tier", tier),
        f"local tier {tier!r} is not writable ({blocker} is not a directory)",
        "pass a --local-tier under a writable directory",
    )
    assert snapshot() == before
    assert blocker.read_text() == "not a directory\n"


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory bind-mounted read-only over itself (root can write anywhere else)."""
    path = tmp_path / "ro"
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"a read-only bind mount is not permitted here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_local_tier_on_a_read_only_mount_is_refused_before_ray_and_nothing_changes(
    tlreg: Callable[..., Any], base: None, no_ray: None, snapshot: Callable, read_only_dir: Path
) -> None:
    before = snapshot()
    tier = f"{read_only_dir}/{{node}}"
    _one_line_error(
        _train(tlreg, "--local-tier", tier),
        f"local tier {tier!r} is not writable ({read_only_dir}: Read-only file system)",
        "fix its permissions or pass another --local-tier",
    )
    assert snapshot() == before
    assert list(read_only_dir.iterdir()) == []


def test_a_local_tier_inside_the_store_is_refused_before_ray(
    tlreg: Callable[..., Any], base: None, no_ray: None, snapshot: Callable, home: Path
) -> None:
    before = snapshot()
    tier = f"{home}/store/tier/{{node}}"
    _one_line_error(
        _train(tlreg, "--local-tier", tier),
        f"local tier {tier!r} overlaps the store {str(home / 'store')!r}",
        "pass another --local-tier",
    )
    assert snapshot() == before
    assert not (home / "store" / "tier").exists()


def test_persist_every_not_a_multiple_of_checkpoint_every_is_refused_before_ray(
    tlreg: Callable[..., Any], base: None, no_ray: None, snapshot: Callable, tmp_path: Path
) -> None:
    before = snapshot()
    _one_line_error(
        _train(tlreg, "--local-tier", str(tmp_path / "t"), "--persist-every", "3"),
        "--persist-every 3 is not a multiple of --checkpoint-every 2: pass e.g. --persist-every 2",
    )
    assert snapshot() == before
    assert not (tmp_path / "t").exists()


def test_persist_every_without_a_local_tier_is_refused_before_ray(
    tlreg: Callable[..., Any], base: None, no_ray: None, snapshot: Callable
) -> None:
    before = snapshot()
    _one_line_error(
        _train(tlreg, "--persist-every", "4"),
        "--persist-every 4 needs a local tier",
        "pass --local-tier PATH or drop --persist-every",
    )
    assert snapshot() == before


def test_init_with_a_bad_local_tier_writes_no_config(
    tlreg: Callable[..., Any], home: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    _one_line_error(
        tlreg("init", "--local-tier", f"{blocker}/{{node}}"), "is not writable", str(blocker)
    )
    assert not (home / "tlreg.toml").exists()
