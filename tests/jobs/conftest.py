"""A real local Ray cluster for the job tests (see ``ray_cluster.py``), started once per
module; and clusters of their own for the tests of its start and stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from ray_cluster import RayCluster, running_ray_cluster, short_temp_dir


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """A one-node Ray cluster with 2 CPUs and a job server, stopped after the module."""
    with running_ray_cluster(short_temp_dir(tmp_path_factory)) as cluster:
        yield cluster


@pytest.fixture
def start_ray_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[], AbstractContextManager[RayCluster]]:
    """Starts a cluster of one's own, for tests of the cluster's own start and stop."""
    return lambda: running_ray_cluster(short_temp_dir(tmp_path_factory))
