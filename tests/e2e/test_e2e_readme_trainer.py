"""README.md's "your own Ray Train loop" example (a user's TorchTrainer checkpointing with
``process_group``), read from the README and run as a user's script on the shared Ray
cluster, twice: the second run resumes the branch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from e2e_harness import Shell
from ray_cluster import RayCluster
from readme_examples import readme_example

from tlreg.registry import Registry

pytestmark = pytest.mark.slow


def test_the_readme_torchtrainer_example_checkpoints_from_every_rank_and_resumes(
    tmp_path: Path, shared_ray_cluster: RayCluster
) -> None:
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    shell = Shell(tmp_path, registry_url, env=shared_ray_cluster.driver_env)
    shell.tlreg("init")
    code = readme_example("own-trainer")
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=shell.env,
            cwd=tmp_path,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    with Registry(registry_url) as registry:
        log = registry.log("my-ddp")
        assert [r.step for r in log] == [40, 30, 20, 10]
        runs = registry.runs("my-ddp")
        assert [r.status for r in runs] == ["succeeded", "succeeded"]  # rank 0's run only
        assert [r.run_id for r in log] == [runs[1].id] * 2 + [runs[0].id] * 2
        assert registry.lease("my-ddp") is None
    # every rank wrote its share: the model and optimizer state are all there
    assert "model/weight" in shell.tlreg("show", "my-ddp", "--tensors")
