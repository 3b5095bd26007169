"""Settings precedence: flags, then environment, then tlreg.toml, then defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlreg.training import ConfigError, load_settings, write_settings
from tlreg.training.task import load_task


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TLREG_HOME", "TLREG_REGISTRY_URL", "TLREG_STORE_URL"):
        monkeypatch.delenv(var, raising=False)


def test_defaults_live_in_the_home(tmp_path: Path) -> None:
    s = load_settings(home=tmp_path)
    assert s.registry_url == f"sqlite:///{tmp_path}/registry.db"
    assert s.store_url == str(tmp_path / "store")


def test_flags_beat_environment_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_settings(
        load_settings(
            home=tmp_path, store_url="s3://file/prefix", registry_url="sqlite:////file.db"
        )
    )
    assert load_settings(home=tmp_path).store_url == "s3://file/prefix"
    monkeypatch.setenv("TLREG_STORE_URL", "/env/store")
    assert load_settings(home=tmp_path).store_url == "/env/store"
    assert load_settings(home=tmp_path, store_url="/flag").store_url == "/flag"
    assert load_settings(home=tmp_path).registry_url == "sqlite:////file.db"


def test_home_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLREG_HOME", str(tmp_path))
    assert load_settings().home == tmp_path


@pytest.mark.parametrize(
    "body, message",
    [("[tlreg\n", "not valid TOML"), ("[tlreg]\nbogus = 1\n", r"unknown keys \['bogus'\]")],
)
def test_a_broken_config_file_is_named_in_the_error(
    tmp_path: Path, body: str, message: str
) -> None:
    (tmp_path / "tlreg.toml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_settings(home=tmp_path)


def test_relative_sqlite_urls_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="relative"):
        load_settings(home=tmp_path, registry_url="sqlite:///rel.db")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nocolon", "is not MODULE:ATTR"),
        ("no_such_module_xyz:t", "cannot import module"),
        ("tlreg.training.examples.digits:missing", "has no attribute 'missing'"),
        ("tlreg.training.examples.digits:DigitsNet", "not a Task"),
    ],
)
def test_bad_task_specs_are_explained(spec: str, message: str) -> None:
    from tlreg.training import TaskNotFound

    with pytest.raises(TaskNotFound, match=message):
        load_task(spec)


def test_run_config_never_records_the_database_password() -> None:
    from tlreg.training import TrainConfig
    from tlreg.training.driver import recorded_config

    config = TrainConfig(
        branch="b",
        task="m:t",
        registry_url="postgresql+psycopg://u:s3cr3t@db/reg",
        store_url="/data",
        freeze=("features.*",),
    )
    doc = recorded_config(config)
    assert "s3cr3t" not in repr(doc)
    assert doc["registry_url"] == "postgresql+psycopg://u:***@db/reg"
    assert doc["freeze"] == ["features.*"]


def test_backbone_learning_rate_multiplier_applies_to_everything_but_the_head() -> None:
    from tlreg.training import TrainConfig
    from tlreg.training.examples.digits import upper
    from tlreg.training.freeze import param_groups

    model = upper.build_model(0)
    model.features[1].weight.requires_grad_(False)
    config = TrainConfig(
        branch="b",
        task="m:t",
        registry_url="sqlite:////r.db",
        store_url="/s",
        lr=0.01,
        backbone_lr_mult=0.1,
    )
    head, backbone = param_groups(model, config, upper.reset)
    assert head["lr"] == 0.01 and [id(p) for p in head["params"]] == [
        id(model.head.weight),
        id(model.head.bias),
    ]
    assert backbone["lr"] == pytest.approx(0.001)
    assert [id(p) for p in backbone["params"]] == [
        id(p) for n, p in model.named_parameters() if n.startswith("features.") and p.requires_grad
    ]
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="froze every parameter"):
        param_groups(model, config, upper.reset)


def test_a_failed_run_is_summarised_by_the_workers_root_cause() -> None:
    from tlreg.training.driver import root_cause

    wrapped = RuntimeError(
        "Training failed due to worker errors:\n"
        '[Rank 0]\nTraceback (most recent call last):\n  File "loop.py", line 3\n'
        "tlreg.training.errors.ConfigError: --freeze ['*'] froze every parameter\n"
    )
    assert root_cause(wrapped) == (
        "tlreg.training.errors.ConfigError: --freeze ['*'] froze every parameter"
    )
    assert root_cause(ValueError("plain")) == "ValueError: plain"


@pytest.mark.parametrize(
    ("url", "removed", "masked"),
    [
        ("postgresql+psycopg://u:s3cr3t@db/reg", "postgresql+psycopg://u@db/reg",
         "postgresql+psycopg://u:***@db/reg"),
        ("s3://AK:s3cr3t@bucket/prefix", "s3://AK@bucket/prefix", "s3://AK:***@bucket/prefix"),
        ("my-fs://u:s3cr3t@host/p", "my-fs://u@host/p", "my-fs://u:***@host/p"),
        ("sqlite:////tmp/r.db", "sqlite:////tmp/r.db", "sqlite:////tmp/r.db"),
        ("/data/store", "/data/store", "/data/store"),
        # the rest of the URL stays as written
        ("https://u:s3cr3t@h/a%20b%2Fc?x=1", "https://u@h/a%20b%2Fc?x=1",
         "https://u:***@h/a%20b%2Fc?x=1"),
        # not URLs SQLAlchemy reads (a port that is not a number): unchanged, no error
        ("file://C:/x", "file://C:/x", "file://C:/x"),
        ("ssh://git@github.com:org/repo", "ssh://git@github.com:org/repo",
         "ssh://git@github.com:org/repo"),
        # a password holding "/" is found by SQLAlchemy's reading
        ("postgresql://u:pa/ss@h/db", "postgresql://u@h/db", "postgresql://u:***@h/db"),
    ],
)  # fmt: skip
def test_one_helper_removes_or_masks_a_urls_password(url: str, removed: str, masked: str) -> None:
    from tlreg.storage_backends.credentials import without_password

    assert without_password(url) == removed
    assert without_password(url, mask=True) == masked
