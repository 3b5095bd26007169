"""Training as Ray jobs on a real local cluster: `tlreg submit --wait`, and a plain
`ray job submit -- tlreg train ...` through the SDK; both leave the job id on the Run row."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from ray.job_submission import JobStatus, JobSubmissionClient

from tlreg.cli.main import cli
from tlreg.registry import Registry
from tlreg.training.jobs import ClusterUnreachable, connect, follow

LOWER = "tlreg.training.examples.digits:lower"

pytestmark = pytest.mark.slow

# ray_cluster (conftest.py): .address, .headers (in-process auth), .client_env (subprocess auth)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tlreg home (SQLite registry, local store) with two empty digits branches; returns
    the TLREG_* environment that names it."""
    root = tmp_path_factory.mktemp("jobs-home")
    env = {
        "TLREG_HOME": str(root / "home"),
        "TLREG_REGISTRY_URL": f"sqlite:///{root / 'home' / 'registry.db'}",
        "TLREG_STORE_URL": str(root / "home" / "store"),
    }
    runner = CliRunner(env=env)
    for args in (
        ["init"],
        ["branch", "digits", "--task", LOWER],
        ["branch", "plain", "--task", LOWER],
    ):
        result = runner.invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return env


def submit(
    cluster: Any, shell_env: dict[str, str], branch: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """``tlreg submit BRANCH ARGS --address CLUSTER`` from a shell with ``shell_env`` (tlreg's
    settings) and the cluster's token in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TLREG_", "RAY_"))}
    env.update(shell_env)
    env.update(cluster.client_env)
    return subprocess.run(
        [sys.executable, "-m", "tlreg.cli", "submit", branch, *args, "--address", cluster.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )


def test_submit_wait_trains_the_branch_and_records_the_job_on_its_run(
    ray_cluster: Any, home: dict[str, str]
) -> None:
    args = "--workers 2 --steps 10 --checkpoint-every 5 --wait --json".split()
    done = submit(ray_cluster, home, "digits", *args)
    assert done.returncode == 0, done.stderr[-4000:]
    job = json.loads(done.stdout)
    assert job["status"] == "SUCCEEDED"
    assert job["submission_id"].startswith("raysubmit_")
    assert "run " in done.stderr  # the job's own logs were followed (to stderr with --json)

    with Registry(home["TLREG_REGISTRY_URL"]) as registry:
        [run] = registry.runs("digits")
        assert run.status == "succeeded"
        assert run.ray_job_id == job["submission_id"]
        assert run.error is None
        assert (run.config["steps"], run.config["workers"], run.config["checkpoint_every"]) == (
            10,
            2,
            5,
        )
        assert [c.step for c in registry.log("digits")] == [10, 5]


def test_plain_ray_job_submit_of_tlreg_train_records_its_job_id(
    ray_cluster: Any, home: dict[str, str]
) -> None:
    # What `ray job submit --runtime-env-json ... -- tlreg train plain ...` sends.
    client = JobSubmissionClient(ray_cluster.address, headers=ray_cluster.headers)
    submission_id = client.submit_job(
        entrypoint="tlreg train plain --workers 1 --steps 2 --checkpoint-every 2",
        runtime_env={"env_vars": {**home, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}},
    )
    status = follow(client, submission_id)
    assert status == "SUCCEEDED", client.get_job_logs(submission_id)[-4000:]

    with Registry(home["TLREG_REGISTRY_URL"]) as registry:
        [run] = registry.runs("plain")
        assert (run.status, run.ray_job_id) == ("succeeded", submission_id)
        assert [c.step for c in registry.log("plain")] == [2]
    # `tlreg runs` shows it too.
    shown = CliRunner(env=home).invoke(cli, ["runs", "plain", "--json"], catch_exceptions=False)
    assert json.loads(shown.output)[0]["ray_job_id"] == submission_id


def test_a_failed_job_exits_1_naming_it_and_pointing_to_its_logs(
    ray_cluster: Any, home: dict[str, str], tmp_path: Path
) -> None:
    # A task module found on the submitter's PYTHONPATH but not on the cluster: submit
    # accepts it, the job's driver cannot import it and fails before recording a run.
    (tmp_path / "only_on_my_laptop.py").write_text(
        "from tlreg.training.examples.digits import lower as task\n"
    )
    done = submit(
        ray_cluster,
        {**home, "PYTHONPATH": str(tmp_path)},
        "plain",
        # --steps above the branch's 2 (an earlier test trained it): submit refuses a target
        # step already reached before it submits anything.
        *("--task", "only_on_my_laptop:task", "--steps", "4", "--wait"),
    )
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    submission_id = done.stdout.splitlines()[0].split()[3]
    assert submission_id.startswith("raysubmit_")
    assert "only_on_my_laptop" in done.stdout  # the job's log, followed
    # The resume's note (the options branch 'plain' was trained with), then one Error line.
    note, *error = done.stderr.strip().splitlines()
    # (the run's number depends on what earlier tests of the module ran on 'plain')
    assert re.match(r"note: resuming 'plain' as run \d+ trained it: ", note), note
    assert len(error) == 1
    assert error[0].startswith(f"Error: Ray job {submission_id} FAILED")
    assert error[0].endswith(f"see ray job logs {submission_id} --address {ray_cluster.address}")
    with Registry(home["TLREG_REGISTRY_URL"]) as registry:
        assert submission_id not in [r.ray_job_id for r in registry.runs()]


def test_a_client_without_the_cluster_token_is_refused_in_one_line(ray_cluster: Any) -> None:
    # This process has no RAY_AUTH_MODE=token and no token: the cluster says no.
    with pytest.raises(ClusterUnreachable) as refused:
        connect(ray_cluster.address)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"Ray job server at {ray_cluster.address} refused the client: ")


def test_ray_job_stop_marks_the_run_stopped_and_keeps_its_committed_checkpoints(
    ray_cluster: Any, home: dict[str, str]
) -> None:
    client = JobSubmissionClient(ray_cluster.address, headers=ray_cluster.headers)
    with Registry(home["TLREG_REGISTRY_URL"]) as registry:
        registry.create_branch("stopme", task=LOWER)
    submission_id = client.submit_job(
        entrypoint="tlreg train stopme --workers 1 --steps 100000 --checkpoint-every 5",
        runtime_env={"env_vars": {**home, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}},
    )
    deadline = time.monotonic() + 120
    with Registry(home["TLREG_REGISTRY_URL"]) as registry:
        while not registry.log("stopme"):  # running, and a checkpoint committed
            assert time.monotonic() < deadline, client.get_job_logs(submission_id)[-3000:]
            assert client.get_job_status(submission_id) in (JobStatus.PENDING, JobStatus.RUNNING)
            time.sleep(0.5)
        assert client.stop_job(submission_id)
        assert follow(client, submission_id) == "STOPPED"
        [run] = registry.runs("stopme")
        assert (run.status, run.ray_job_id) == ("stopped", submission_id)
        assert run.error == "stopped by SIGTERM"
        assert run.finished is not None
        # what it committed before the stop stays, whole
        head = registry.get_branch("stopme").head
        assert head == registry.log("stopme")[0].id
    shown = CliRunner(env=home).invoke(cli, ["runs", "stopme", "--json"], catch_exceptions=False)
    assert json.loads(shown.output)[0]["status"] == "stopped"
