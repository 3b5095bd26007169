"""The real cluster path with a node-local tier (issue 16): a multi-node Ray cluster on this
machine (``ray.cluster_utils.Cluster``: a head that runs no worker and nodes of one CPU each,
so the two ranks of ``--workers 2`` run on two different nodes), PostgreSQL as the registry,
the S3 server as the shared store and ``--local-tier .../{node}``: each node its own tier.

- a SIGKILLed worker: Ray Train restarts the group on the same two nodes and it resumes from
  the local tier (the run says so), with no step done twice, and finishes;
- a node removed mid-run: its local-only checkpoints become ``lost``, the run resumes on the
  survivor and a spare node from the newest checkpoint still reachable (a shared one), every
  checkpoint it can serve verifies, and no shared checkpoint is lost.

The two tests share one cluster (in file order: the spare node joins for the second).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from ray_cluster import short_temp_dir

from tlreg.ckpt import verify
from tlreg.registry import CheckpointRecord, Registry
from tlreg.storage_backends import open_store

pytestmark = pytest.mark.slow

TASK = "tlreg.training.examples.digits:lower"
STEPS = 60
EVERY = 2  # a local checkpoint every 2 steps...
PERSIST = 10  # ...and every 10th step drained to the S3 store


@dataclass
class TierCluster:
    cluster: Any  # ray.cluster_utils.Cluster
    nodes: list[Any]  # the worker nodes (ray._private.node.Node), head excluded
    env: dict[str, str]
    node_args: dict[str, Any]
    """What a node of this cluster is started with."""

    def node_of(self, node_id: str) -> Any:
        [node] = [n for n in self.nodes if n.node_id == node_id]
        return node

    def train_workers(self) -> list[psutil.Process]:
        """The Ray Train worker processes of this cluster's nodes."""
        found = []
        for node in self.nodes:
            raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
            for p in raylet.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join([p.name(), *p.cmdline()]):
                        found.append(p)
                except psutil.NoSuchProcess:
                    continue
        return found


@pytest.fixture(scope="module")
def tier_cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: Any) -> Iterator[TierCluster]:
    """A head (no CPU: it runs the Train controller and the event queue, no rank) and two
    one-CPU nodes; the workers it spawns see the S3 server's credentials."""
    from ray.cluster_utils import Cluster

    aws = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
        "AWS_ENDPOINT_URL_S3": s3_server.endpoint_url,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    temp_dir = short_temp_dir(tmp_path_factory)
    with pytest.MonkeyPatch.context() as mp:
        # the nodes' processes (and the workers they spawn) inherit this environment
        # loopback everywhere: without it a driver joining 127.0.0.1 is sent to the host's IP
        loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
        for k, v in {**aws, **loopback, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}.items():
            mp.setenv(k, v)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE", "RAY_ADDRESS"):
            mp.delenv(k, raising=False)
        common: dict[str, Any] = {
            "node_ip_address": "127.0.0.1",
            "object_store_memory": 80 * 1024 * 1024,
            "temp_dir": str(temp_dir),
        }
        cluster = Cluster(
            initialize_head=True,
            head_node_args={**common, "num_cpus": 0, "include_dashboard": False},
        )
        try:
            nodes = [cluster.add_node(num_cpus=1, **common) for _ in range(2)]
            cluster.wait_for_nodes()
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("TLREG_")},
                "RAY_ADDRESS": cluster.address,
            }
            yield TierCluster(cluster=cluster, nodes=nodes, env=env, node_args=common)
        finally:
            cluster.shutdown()


@pytest.fixture
def shell(
    tier_cluster: TierCluster, registry_url: str, s3_bucket_url: str, tmp_path: Path
) -> dict[str, str]:
    """The environment of a user whose home records PostgreSQL and the S3 store, with a
    branch ``base``; ``TLREG_LOCAL_TIER`` names each node's tier under ``tmp_path``."""
    env = {
        **tier_cluster.env,
        **{k: v for k, v in os.environ.items() if k.startswith("AWS_")},
        "TLREG_HOME": str(tmp_path / "home"),
        "TLREG_REGISTRY_URL": registry_url,
        "TLREG_STORE_URL": s3_bucket_url,
        "TLREG_LOCAL_TIER": str(tmp_path / "tiers" / "{node}"),
    }
    for args in (["init"], ["branch", "base", "--task", TASK]):
        done = subprocess.run(
            [sys.executable, "-m", "tlreg.cli", *args], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
    return env


def _train(env: dict[str, str]) -> subprocess.Popen[str]:
    args = ["--workers", "2", "--steps", str(STEPS), "--checkpoint-every", str(EVERY)]
    args += ["--persist-every", str(PERSIST), "--max-failures", "2", "--eval-every", "10"]
    return subprocess.Popen(
        [sys.executable, "-m", "tlreg.cli", "train", "base", *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(
    proc: subprocess.Popen[str], registry: Registry, ready: Any, what: str
) -> list[CheckpointRecord]:
    """Poll the branch's checkpoints until ``ready(checkpoints)``; they are returned."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        checkpoints = registry.checkpoints()
        if ready(checkpoints):
            return checkpoints
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate(timeout=60)
    raise AssertionError(f"training ended, or never had {what}: {err[-3000:]}")


def _chain_steps(registry: Registry) -> list[int]:
    """Steps of the branch's first-parent chain, oldest first."""
    return [r.step for r in reversed(registry.log("base"))]


def _finish(proc: subprocess.Popen[str]) -> tuple[dict[str, Any], str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out), err


@pytest.mark.parametrize("registry_url", ["postgres"], indirect=True)
def test_a_killed_worker_resumes_from_the_local_tier_without_repeating_a_step(
    tier_cluster: TierCluster, shell: dict[str, str], registry_url: str
) -> None:
    registry = Registry(registry_url)
    proc = _train(shell)
    try:
        # a local-only checkpoint is the head (one past a shared one): the restart can only
        # resume from it from the nodes' tiers
        ready = _wait_for(
            proc,
            registry,
            lambda cs: any(c.tier == "local" and c.step > PERSIST for c in cs),
            "a local checkpoint after a shared one",
        )
        workers = tier_cluster.train_workers()
        assert len(workers) == 2
        os.kill(workers[-1].pid, signal.SIGKILL)
        summary, err = _finish(proc)

        assert summary["restores"] == 2  # the first start, and the restart
        assert summary["restored_tier"] == "local"
        resumed = registry.get(summary["resumed_from"])
        assert resumed.step >= max(c.step for c in ready)
        assert f"at step {resumed.step} from the local tier" in err
        steps = _chain_steps(registry)
        assert steps == list(range(EVERY, STEPS + 1, EVERY))  # each once, none missing
        [run] = registry.runs("base")
        assert run.status == "succeeded"
        assert sorted(set(run.nodes.values())) == sorted(n.node_id for n in tier_cluster.nodes)
        head = registry.resolve("base")
        assert (head.step, head.tier) == (STEPS, "shared")
        store = open_store(shell["TLREG_STORE_URL"])
        for record in registry.checkpoints():
            assert record.tier in ("local", "shared")
            if record.tier == "shared":
                assert record.step % PERSIST == 0
                report = verify(store, record.manifest)
                assert report.ok, report.problems
    finally:
        if proc.poll() is None:
            proc.kill()
        registry.close()


@pytest.mark.parametrize("registry_url", ["postgres"], indirect=True)
def test_a_removed_node_loses_only_its_local_checkpoints_and_the_run_resumes_from_shared(
    tier_cluster: TierCluster, shell: dict[str, str], registry_url: str, tmp_path: Path
) -> None:
    spare = tier_cluster.cluster.add_node(num_cpus=1, **tier_cluster.node_args)
    tier_cluster.cluster.wait_for_nodes()
    tier_cluster.nodes.append(spare)  # three nodes for two ranks: one to lose, one spare
    registry = Registry(registry_url)
    proc = _train(shell)
    try:
        before = _wait_for(
            proc,
            registry,
            lambda cs: any(c.tier == "local" and c.step > PERSIST for c in cs),
            "a local checkpoint after a shared one",
        )
        [run] = registry.runs("base")
        ranks = dict(run.nodes)
        victim = tier_cluster.node_of(ranks[1])  # rank 1's node: its shares go with it
        tier_cluster.cluster.remove_node(victim)
        tier_cluster.nodes.remove(victim)
        summary, err = _finish(proc)

        checkpoints = {c.id: c for c in registry.checkpoints()}
        shared_before = {c.id for c in before if c.tier == "shared"}
        lost = {c.id for c in checkpoints.values() if c.tier == "lost"}
        assert lost, "no local checkpoint was lost with its node"
        assert set(summary["lost"]) == lost
        assert all(victim.node_id in checkpoints[c].nodes for c in lost)
        assert shared_before <= {c.id for c in checkpoints.values() if c.tier == "shared"}
        newest_shared = max((checkpoints[c] for c in shared_before), key=lambda c: c.step)
        resumed = checkpoints[summary["resumed_from"]]
        assert resumed.tier == "shared" and resumed.step >= newest_shared.step
        assert all(checkpoints[c].step % PERSIST for c in lost)  # local-only ones, only
        # every local-only checkpoint past the resume point, made before the node went, is lost
        assert {c.id for c in before if c.tier == "local" and c.step > resumed.step} <= lost
        assert f"resuming from {resumed.id[:12]} at step {resumed.step}" in err
        steps = _chain_steps(registry)
        assert steps == list(range(EVERY, STEPS + 1, EVERY))
        # the line past the resume point holds none; lost ones behind it are history
        on_line = lost & {r.id for r in registry.log("base")}
        assert all(checkpoints[c].step < resumed.step for c in on_line)
        head = registry.resolve("base")
        assert (head.step, head.tier) == (STEPS, "shared")
        store = open_store(shell["TLREG_STORE_URL"])
        for record in checkpoints.values():
            if record.tier == "shared":
                report = verify(store, record.manifest)
                assert report.ok, report.problems
        assert registry.restorable_head("base").id == head.id
    finally:
        if proc.poll() is None:
            proc.kill()
        registry.close()
