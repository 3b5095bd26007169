"""A real local Ray cluster for tests: ``running_ray_cluster`` (shared by the job tests in
``tests/jobs`` and the end-to-end tests in ``tests/e2e``, whose fixtures wrap it).

It runs ``ray start --head --block`` on 127.0.0.1 with every port it opens chosen free by us,
its own short temp dir (Unix socket paths must stay under ~107 bytes) and token
authentication on, with a fresh token. It is stopped by signalling only the processes it
started: ``ray stop`` would stop every Ray on the machine, other people's included. Its
processes are found by their session (``ray start``'s) and by a marker in their environment,
which everything the cluster spawns inherits: not all of them stay below ``ray start`` in the
process tree.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests


@dataclass(frozen=True)
class RayCluster:
    """Where the test cluster's job server and GCS listen and the token they accept."""

    address: str
    """The job server (dashboard): ``http://127.0.0.1:PORT``."""
    gcs_address: str
    """The GCS, which ``ray.init(address=...)`` (or ``RAY_ADDRESS``) joins: ``127.0.0.1:PORT``."""
    token: str
    temp_dir: Path
    marker: str
    """The value of :data:`MARKER` in the environment of every process of this cluster."""
    session: int
    """``ray start``'s pid: the session id of the processes of this cluster that start none."""

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that authenticate a JobSubmissionClient in this process."""
        return {"Authorization": f"Bearer {self.token}"}

    def processes(self) -> list[psutil.Process]:
        """The live processes of this cluster (see :func:`cluster_processes`)."""
        return cluster_processes(self.marker, self.session)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment variables for a separate process that talks to the cluster."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @property
    def driver_env(self) -> dict[str, str]:
        """Environment variables for a separate process whose ``ray.init()`` joins the
        cluster as a driver (``RAY_ADDRESS``, as a user pointed at a cluster sets it)."""
        return {"RAY_ADDRESS": self.gcs_address, **self.client_env}


MARKER = "TLREG_TEST_RAY_CLUSTER"
"""Environment variable set to a fresh value for each test cluster's ``ray start``."""


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together so that none repeats)."""
    with ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def short_temp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh temp dir for a cluster, short enough for the Unix sockets Ray puts in it."""
    # Ray puts sockets at <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store
    # (~65 bytes below <temp>): use pytest's dir when that fits in sun_path, /tmp otherwise.
    candidate = tmp_path_factory.mktemp("ray", numbered=True)
    if len(str(candidate)) <= 36:
        return candidate
    return Path(tempfile.mkdtemp(prefix="tlreg-ray-"))


@contextmanager
def running_ray_cluster(temp_dir: Path) -> Iterator[RayCluster]:
    """A one-node Ray cluster with 2 CPUs in ``temp_dir`` (removed afterwards); on exit every
    process of the cluster is stopped, and it fails if one survives."""
    (
        gcs,
        object_manager,
        node_manager,
        client_server,
        dashboard,
        agent_http,
        agent_grpc,
        runtime_env_agent,
        metrics,
    ) = _free_ports(9)
    token = secrets.token_hex(32)
    marker = secrets.token_hex(8)
    cluster_env = {
        **os.environ,
        # The venv's python first: job entrypoints run `python -m tlreg.cli ...`.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # Jobs get their tlreg settings from their runtime_env, never from the cluster's shell.
    for name in [n for n in cluster_env if n.startswith("TLREG_")]:
        del cluster_env[name]
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        cluster_env.pop(name, None)
    cluster_env[MARKER] = marker
    args = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=2",
        f"--port={gcs}", f"--object-manager-port={object_manager}",
        f"--node-manager-port={node_manager}", f"--ray-client-server-port={client_server}",
        f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}", f"--metrics-export-port={metrics}",
        # 0/0: each worker binds a port the kernel picks, not one of a fixed range.
        "--min-worker-port=0", "--max-worker-port=0",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, env=cluster_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        cluster = RayCluster(
            address=f"http://127.0.0.1:{dashboard}",
            gcs_address=f"127.0.0.1:{gcs}",
            token=token,
            temp_dir=temp_dir,
            marker=marker,
            session=proc.pid,
        )
        try:
            _wait_until_accepting_jobs(cluster, proc, log_path)
            yield cluster
        finally:
            _stop(proc, cluster)
        survivors = cluster.processes()
        assert not survivors, f"processes of the test Ray cluster outlived it: {survivors}"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_accepting_jobs(
    cluster: RayCluster, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll the job API until it lists jobs; fail with the log tail if it never does."""
    deadline = time.monotonic() + 90
    error: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            r = requests.get(f"{cluster.address}/api/jobs/", headers=cluster.headers, timeout=2)
            if r.status_code == 200:
                return
            error = f"HTTP {r.status_code}: {r.text[:200]}"
        except requests.RequestException as e:
            error = e
        time.sleep(0.3)
    _stop(proc, cluster)
    pytest.fail(
        f"ray start did not serve jobs (exit code {proc.poll()}, last error {error!r}).\n"
        f"log tail:\n{log.read_text(errors='replace')[-4000:]}"
    )


def cluster_processes(marker: str, session: int) -> list[psutil.Process]:
    """The live processes of a test cluster: ``ray start`` and whatever it, its raylet or
    its jobs started. Those in its session (all but the job drivers and what they start,
    which Ray puts in sessions of their own), and those with :data:`MARKER` set to
    ``marker`` (all, unless a process title overwrote the environment, as Ray's agents'
    does)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(p.pid) == session or p.environ().get(MARKER) == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue  # gone, or not ours (other users' processes cannot be read)
    return found


def _stop(proc: subprocess.Popen[bytes], cluster: RayCluster) -> None:
    """Stop every process this `ray start` started, and nothing else.

    The process tree below ``proc`` is not enough: a process whose parent exits first is
    re-parented to init and leaves the tree, and Ray's do. At ``ray job stop`` the job's
    ``sh -c`` dies before its driver; the job supervisor's watcher runs in a session of its
    own and outlives the supervisor; and when ``ray start --block`` sees one of its
    subprocesses die it kills the raylet and exits, leaving every worker (a Train
    controller included) to init. So the processes are found by the cluster's session and
    marker as well as by the tree. SIGTERM makes ``ray start --block`` drain for up to 30 s, so
    survivors get SIGKILL after a short grace period; then the same again for anything
    started meanwhile.
    """
    for _ in range(5):
        try:
            root = psutil.Process(proc.pid) if proc.poll() is None else None
            tree = [root, *root.children(recursive=True)] if root else []
        except psutil.NoSuchProcess:
            tree = []
        targets = {p.pid: p for p in [*tree, *cluster.processes()]}
        if not targets:
            break
        for p in targets.values():
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(list(targets.values()), timeout=2)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        if proc.poll() is None:
            proc.wait(timeout=5)
