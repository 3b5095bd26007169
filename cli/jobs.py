"""``tlreg submit``: run ``tlreg train`` on a Ray cluster through Ray's job submission API."""

from __future__ import annotations

import copy
import logging
from typing import Any

import click

from tlreg.cli.common import Env, echo_json, json_option, pass_env
from tlreg.cli.train import given_options, train_config
from tlreg.cli.train import train as train_command
from tlreg.training.jobs import DEFAULT_ADDRESS, connect, failure, follow, submit_train
from tlreg.training.preflight import preflight


@click.command()
@click.argument("branch")
@click.option(
    "--address",
    default=DEFAULT_ADDRESS,
    show_default=True,
    envvar="RAY_API_SERVER_ADDRESS",
    help="Ray job server (the head node's dashboard URL).",
)
@click.option("--wait", is_flag=True, help="Follow the job's logs; exit 1 unless it succeeds.")
@json_option
@pass_env
def submit(env: Env, branch: str, address: str, wait: bool, as_json: bool, **options: Any) -> None:
    """Submit `tlreg train BRANCH ...` to a Ray cluster as a job and print its id.

    The job gets this machine's registry and store locations, never credentials: the
    cluster's nodes must have their own (AWS_* for S3, PGPASSWORD or ~/.pgpass).

    Example: tlreg submit upper-head --steps 200 --address http://HEAD:8265
    """
    # Refuse what would only fail on the cluster: a bad branch, task or option, a branch with
    # a live run, a target step already reached, a --freeze that matches nothing, a dead
    # address. (The store is probed by the job itself: the cluster may mount paths this
    # machine does not.)
    config = train_config(env, branch, options.pop("task"), options, given=given_options())
    preflight(config, env.registry, probe_store=False)
    client = connect(address)
    job = submit_train(config, address=address, home=env.settings.home, client=client)
    for what in job.dropped:
        click.echo(f"note: the {what} was not sent; the cluster must supply it", err=True)
    if not as_json:
        click.echo(f"submitted Ray job {job.submission_id} to {address}")
    if not wait:
        if as_json:
            status = str(client.get_job_status(job.submission_id).value)
            echo_json({**job.to_json(), "status": status})
        else:
            click.echo(f"  follow it: ray job logs -f {job.submission_id} --address {address}")
        return
    # Ray's client logs an INFO line when the log stream closes; the job's end is ours to say.
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)
    try:
        # With --json, stdout carries only the final JSON; the job's logs go to stderr.
        status = follow(
            client, job.submission_id, on_log=lambda s: click.echo(s, nl=False, err=as_json)
        )
    except KeyboardInterrupt:
        raise click.ClickException(
            f"stopped following Ray job {job.submission_id}; it keeps running "
            f"(ray job stop {job.submission_id} --address {address} ends it)"
        ) from None
    if as_json:
        echo_json({**job.to_json(), "status": status})
    if status != "SUCCEEDED":
        raise failure(client, job, status)
    if not as_json:
        click.echo(f"Ray job {job.submission_id} {status}")


# Every `tlreg train` option (but --json) means the same here: reuse their definitions.
submit.params[1:1] = [
    copy.copy(p)
    for p in train_command.params
    if isinstance(p, click.Option) and p.name != "as_json"
]

COMMANDS = [submit]
