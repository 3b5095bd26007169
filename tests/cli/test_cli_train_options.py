"""`tlreg train`'s options take their defaults from TrainConfig, so the two cannot drift."""

from __future__ import annotations

import dataclasses

import click

from tlreg.cli.train import train as train_command
from tlreg.training import TrainConfig

# Fields that are not options: the argument, the branch's own task, and the settings.
NOT_OPTIONS = {"branch", "task", "registry_url", "store_url"}


def test_every_train_option_default_equals_the_train_config_default() -> None:
    parsed = train_command.make_context("train", ["some-branch"]).params
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_OPTIONS]
    assert fields
    for f in fields:
        assert parsed[f.name] == f.default, f.name
        assert type(parsed[f.name]) is type(f.default), f.name


def test_every_train_config_field_is_a_train_option_and_no_option_is_extra() -> None:
    options = {p.name for p in train_command.params if isinstance(p, click.Option)}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields - NOT_OPTIONS <= options
    assert options - fields == {"as_json"}
