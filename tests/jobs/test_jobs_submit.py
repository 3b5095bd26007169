"""`tlreg submit` without a cluster: what it sends, what it refuses, how a driver finds its
job id. Fast; the tests against a real cluster are in test_jobs_cluster.py."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from tlreg.cli.jobs import submit
from tlreg.cli.main import cli
from tlreg.cli.train import train as train_command
from tlreg.registry import Registry
from tlreg.training import TrainConfig
from tlreg.training.jobs import (
    ClusterUnreachable,
    connect,
    current_submission_id,
    job_env,
    train_argv,
    train_entrypoint,
)

LOWER = "tlreg.training.examples.digits:lower"

Invoke = Callable[..., Result]


@pytest.fixture
def registry_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'home' / 'registry.db'}"


@pytest.fixture
def tlreg(tmp_path: Path, registry_url: str, monkeypatch: pytest.MonkeyPatch) -> Invoke:
    """``tlreg ARGS`` in-process in a fresh home."""
    for var in ("TLREG_STORE_URL", "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TLREG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TLREG_REGISTRY_URL", registry_url)

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)

    return invoke


def dead_address() -> str:
    """An http address on 127.0.0.1 where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def config(**overrides: object) -> TrainConfig:
    fields: dict[str, object] = {
        "branch": "b",
        "task": LOWER,
        "registry_url": "sqlite:////tmp/r.db",
        "store_url": "/tmp/store",
    }
    return TrainConfig(**{**fields, **overrides})


def test_train_argv_parses_back_to_the_same_config_with_tlreg_train() -> None:
    original = config(
        workers=3, steps=17, checkpoint_every=4, eval_every=2, freeze=("features.*", "x.y"),
        lr=0.25, batch_size=5, seed=9, lazy=True, max_failures=2,
    )  # fmt: skip
    argv = train_argv(original)
    assert argv[:2] == ["train", "b"]
    ctx = train_command.make_context("train", argv[1:])
    params = {k: v for k, v in ctx.params.items() if k != "as_json"}
    parsed = TrainConfig(registry_url=original.registry_url, store_url=original.store_url, **params)
    assert parsed == original


def test_every_train_option_is_a_submit_option() -> None:
    def options(command: click.Command) -> set[str]:
        return {o for p in command.params if isinstance(p, click.Option) for o in p.opts}

    assert options(train_command) <= options(submit)
    assert {"--address", "--wait", "--json"} <= options(submit)


def test_entrypoint_is_quoted_for_the_shell() -> None:
    entry = train_entrypoint(config(freeze=("features.*",)))
    assert entry.startswith("python -m tlreg.cli train b --task ")
    assert "--freeze 'features.*'" in entry


def test_current_submission_id_reads_the_job_config_ray_gives_its_drivers() -> None:
    injected = json.dumps(
        {"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "x"}}
    )
    assert current_submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": injected}) == "raysubmit_abc"
    assert current_submission_id({}) is None
    assert current_submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"}) is None
    assert current_submission_id({"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"metadata": {}}'}) is None


def test_job_env_sends_locations_but_never_passwords(tmp_path: Path) -> None:
    env, dropped = job_env(
        config(
            registry_url="postgresql+psycopg://alice:s3cret@db.example:5432/tlreg",
            store_url="s3://bucket/prefix",
        ),
        tmp_path,
    )
    assert env["TLREG_REGISTRY_URL"] == "postgresql+psycopg://alice@db.example:5432/tlreg"
    assert env["TLREG_STORE_URL"] == "s3://bucket/prefix"
    assert env["TLREG_HOME"] == str(tmp_path)
    assert not any("s3cret" in v for v in env.values())
    assert dropped == ["registry password"]


def test_job_env_makes_a_relative_store_path_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env, dropped = job_env(config(store_url="rel/store"), tmp_path)
    assert env["TLREG_STORE_URL"] == str(tmp_path / "rel" / "store")
    assert dropped == []


def test_connect_to_a_dead_address_fails_fast_naming_it() -> None:
    address = dead_address()
    started = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=f"no Ray job server at {address}"):
        connect(address)
    assert time.monotonic() - started < 5


def test_submit_to_unreachable_address_fails_in_one_line_and_records_no_run(
    tlreg: Invoke, registry_url: str
) -> None:
    assert tlreg("init").exit_code == 0
    assert tlreg("branch", "digits", "--task", LOWER).exit_code == 0
    address = dead_address()
    started = time.monotonic()
    result = tlreg("submit", "digits", "--steps", "10", "--address", address, "--wait")
    assert time.monotonic() - started < 10
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: no Ray job server at {address} (connection failed)")
    with Registry(registry_url) as registry:
        assert registry.runs() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "nope"),
        (["digits", "--task", "tlreg.training.examples.digits:missing"], "missing"),
        (["digits", "--steps", "0"], "--steps must be >= 1"),
    ],
    ids=["unknown-branch", "unknown-task", "bad-option"],
)
def test_submit_refuses_bad_input_before_contacting_the_cluster(
    tlreg: Invoke, args: list[str], message: str
) -> None:
    assert tlreg("init").exit_code == 0
    assert tlreg("branch", "digits", "--task", LOWER).exit_code == 0
    # The address is dead: reaching it would fail with a different error.
    result = tlreg("submit", *args, "--address", dead_address())
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert message in result.output
    assert "Ray job server" not in result.output
