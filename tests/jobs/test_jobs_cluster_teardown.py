"""The test cluster's teardown stops every process the cluster started, also those that
left ``ray start``'s process tree (re-parented to init, as Ray's own do at ``ray job stop``,
and all its workers when ``ray start --block`` exits because one of its processes died)."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psutil
import pytest
from ray.job_submission import JobSubmissionClient

from tlreg.training.jobs import follow

pytestmark = pytest.mark.slow

# A job that leaves a process behind in a session of its own, its parent gone: init's child.
ESCAPE = (
    "import subprocess, sys; "
    "p = subprocess.Popen(['sleep', '600'], start_new_session=True); "
    "open(sys.argv[1], 'w').write(str(p.pid))"
)


def test_stopping_the_test_cluster_ends_a_process_that_left_its_tree(
    start_ray_cluster: Callable[[], AbstractContextManager[Any]], tmp_path: Path
) -> None:
    pid_file = tmp_path / "escaped.pid"
    escaped: psutil.Process | None = None
    try:
        with start_ray_cluster() as cluster:
            client = JobSubmissionClient(cluster.address, headers=cluster.headers)
            job = client.submit_job(entrypoint=f'{sys.executable} -c "{ESCAPE}" {pid_file}')
            assert follow(client, job) == "SUCCEEDED", client.get_job_logs(job)[-3000:]
            # Its parent, the job's driver, has exited: it is no child of the cluster's.
            escaped = psutil.Process(int(pid_file.read_text()))
            assert escaped in cluster.processes()
        assert not escaped.is_running() or escaped.status() == psutil.STATUS_ZOMBIE
    finally:
        if escaped is not None and escaped.is_running():
            os.kill(escaped.pid, signal.SIGKILL)  # this test's own process, only on failure


# A job whose actor lives until it is killed.
SLEEPER = """
import time, ray
ray.init()
@ray.remote
class Sleeper:
    def ready(self):
        return True
sleeper = Sleeper.remote()
ray.get(sleeper.ready.remote())
time.sleep(600)
"""


def test_stopping_the_test_cluster_ends_the_workers_that_ray_start_left_behind(
    start_ray_cluster: Callable[[], AbstractContextManager[Any]], tmp_path: Path
) -> None:
    (tmp_path / "sleeper.py").write_text(SLEEPER)
    spawned: list[psutil.Process] = []
    try:
        with start_ray_cluster() as cluster:
            client = JobSubmissionClient(cluster.address, headers=cluster.headers)
            job = client.submit_job(entrypoint=f"{sys.executable} {tmp_path / 'sleeper.py'}")
            deadline = time.monotonic() + 60
            while "ray::Sleeper" not in _titles(cluster.processes()):
                assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
                time.sleep(0.3)
            spawned = cluster.processes()
            [ray_start] = [p for p in spawned if p.pid == cluster.session]
            [log_monitor] = [p for p in spawned if "log_monitor" in _titles([p])]
            # ray start --block then kills the raylet, GCS, dashboard... and exits.
            log_monitor.kill()
            ray_start.wait(timeout=30)
            left = [p for p in spawned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            assert left  # the job's driver, the actor, Ray's agents: now init's children
        assert not [p for p in spawned if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for p in spawned:  # this test's cluster's processes, only on failure
            if p.is_running():
                os.kill(p.pid, signal.SIGKILL)


def _titles(processes: list[psutil.Process]) -> str:
    """The command lines of ``processes`` that are still there, in one string."""
    titles = []
    for p in processes:
        try:
            titles.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return "\n".join(titles)
