"""The test cluster's teardown stops every process the cluster started, also those that
left ``ray start``'s process tree (re-parented to init, as Ray's own do at ``ray job stop``)."""

from __future__ import annotations

import os
import signal
import sys
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
