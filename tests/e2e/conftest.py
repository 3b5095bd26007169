"""End-to-end tests: a user's shell per test (``make_shell`` from ``e2e_harness``).

``tlreg train`` in a shell from ``make_shell`` starts its own local Ray, as it does for a
user by default; in a shell from ``make_cluster_shell`` it joins one Ray cluster shared by
the tests in this directory (``RAY_ADDRESS``, as for a user pointed at a cluster), which
saves a Ray start-up per training run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_harness import Shell, make_shell
from ray_cluster import RayCluster, running_ray_cluster, short_temp_dir

__all__ = ["make_cluster_shell", "make_shell", "shared_ray_cluster"]


@pytest.fixture(scope="package")
def shared_ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs: one per Train worker of ``--workers 2``;
    the Train controller asks for none), stopped after the last test in tests/e2e."""
    with running_ray_cluster(short_temp_dir(tmp_path_factory)) as cluster:
        yield cluster


@pytest.fixture
def make_cluster_shell(tmp_path: Path, shared_ray_cluster: RayCluster) -> Callable[..., Shell]:
    """``make_cluster_shell(registry_url, store_url=None)``: like ``make_shell``, but with
    ``RAY_ADDRESS`` and the token of ``shared_ray_cluster`` in the shell's environment."""
    return lambda registry_url, store_url=None: Shell(
        tmp_path, registry_url, store_url, env=shared_ray_cluster.driver_env
    )
