"""Where a run's local tier comes from and which checkpoints it drains (issue 16): the flag, then
``TLREG_LOCAL_TIER``, then ``tlreg.toml``'s ``local_tier`` (written by ``tlreg init
--local-tier``), else none; ``--persist-every`` picks the checkpoints that go on to the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tlreg.cli.main import cli
from tlreg.training.config import TrainConfig, load_settings

TASK = "tlreg.training.examples.digits:lower"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("TLREG_HOME", "TLREG_REGISTRY_URL", "TLREG_STORE_URL", "TLREG_LOCAL_TIER"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("TLREG_HOME", str(home))
    return home


def test_the_local_tier_comes_from_the_flag_then_the_environment_then_tlreg_toml(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings().local_tier is None  # the embedded defaults have no tier
    result = CliRunner().invoke(
        cli, ["init", "--local-tier", str(tmp_path / "nvme" / "{node}"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["local_tier"] == f"{tmp_path}/nvme/{{node}}"
    assert f'local_tier = "{tmp_path}/nvme/{{node}}"' in (clean_env / "tlreg.toml").read_text()
    assert not (tmp_path / "nvme").exists()  # the probe left nothing
    assert load_settings().local_tier == f"{tmp_path}/nvme/{{node}}"
    monkeypatch.setenv("TLREG_LOCAL_TIER", "/dev/shm/tlreg/{node}")
    assert load_settings().local_tier == "/dev/shm/tlreg/{node}"
    assert load_settings(local_tier="~/t").local_tier == str(Path("~/t").expanduser())


def test_a_home_initialised_without_a_tier_records_none(clean_env: Path) -> None:
    result = CliRunner().invoke(cli, ["init"])
    assert result.exit_code == 0, result.output
    assert "local_tier" not in (clean_env / "tlreg.toml").read_text()
    assert "local tier" not in result.output


def _config(**kw: object) -> TrainConfig:
    return TrainConfig(branch="b", task=TASK, registry_url="sqlite:////r.db", store_url="/s", **kw)  # type: ignore[arg-type]


def test_persist_every_drains_every_mth_step_and_the_last() -> None:
    config = _config(steps=23, checkpoint_every=5, persist_every=10, local_tier="/t/{node}")
    drained = [s for s in range(5, 24, 5) if config.persists(s)] + [23] * config.persists(23)
    assert drained == [10, 20, 23]
    assert not config.persists(5) and not config.persists(15)


def test_without_persist_every_or_a_tier_every_checkpoint_is_drained() -> None:
    assert all(_config(local_tier="/t").persists(s) for s in (1, 5, 7))
    assert all(_config().persists(s) for s in (1, 5, 7))
