"""Run ``tlreg train`` as a Ray job: submit it, follow it, and know which job we are in.

``tlreg submit`` and ``ray job submit -- tlreg train ...`` start the same entry point. Either
way the driver finds its submission id in the job config that Ray's job supervisor hands
every job driver (:func:`current_submission_id`), and :func:`~tlreg.training.driver.train`
records it on the registry's Run row.

What travels with a submitted job: the registry and store locations (``TLREG_REGISTRY_URL``,
``TLREG_STORE_URL``, ``TLREG_HOME``) as runtime_env ``env_vars``, which Ray shows to anyone
who can read its dashboard or ``ray job list``. Credentials therefore never travel: a password
in the registry or store URL is dropped before submitting, and S3 credentials (``AWS_*``, an
instance profile, ``~/.aws``) and database passwords (``PGPASSWORD``, ``~/.pgpass``) must come
from the environment of the cluster's nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tlreg.storage_backends.credentials import without_password
from tlreg.training.errors import TrainingError

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from tlreg.training.config import TrainConfig

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
"""Ray's job server (the dashboard) on a local head node."""

# Set by Ray's JobSupervisor in every job driver's environment: the job's runtime_env and
# metadata, whose "job_submission_id" is the id `ray job submit` / submit_job returned.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_SUBMISSION_ID_KEY = "job_submission_id"

# Fields of TrainConfig that travel as environment variables, not as `tlreg train` flags.
_NOT_FLAGS = frozenset({"branch", "registry_url", "store_url"})


class ClusterUnreachable(TrainingError, ConnectionError):
    """No Ray job server answers at the address (or it refused our credentials)."""


class JobFailed(TrainingError, RuntimeError):
    """A followed Ray job ended in a status other than SUCCEEDED."""


@dataclass(kw_only=True, slots=True)
class SubmittedJob:
    """A ``tlreg train`` job handed to a Ray cluster."""

    submission_id: str
    """Ray's id for the job (``raysubmit_...``), also recorded on the Run row."""
    address: str
    """The job server it was submitted to."""
    entrypoint: str
    """The shell command the cluster runs."""
    env_vars: dict[str, str]
    """What the job's runtime_env carries (no credentials)."""
    dropped: tuple[str, ...] = ()
    """Credentials that were found in the settings and not sent (e.g. "registry password")."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict of every field."""
        doc = dataclasses.asdict(self)
        doc["dropped"] = list(self.dropped)
        return doc


def current_submission_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The Ray job submission id of this process when it is a job's driver, else None.

    Works before ``ray.init``: Ray passes the job config to the driver as an environment
    variable, not through the cluster.
    """
    raw = (os.environ if environ is None else environ).get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        metadata = json.loads(raw).get("metadata") or {}
    except (ValueError, AttributeError):
        return None  # not ours to validate; the run is still recorded, without a job id
    value = metadata.get(_SUBMISSION_ID_KEY) if isinstance(metadata, dict) else None
    return str(value) if value else None


def train_argv(config: TrainConfig) -> list[str]:
    """``tlreg train`` arguments that reproduce ``config`` exactly (every field explicit,
    so the job does not depend on the defaults of the tlreg installed on the cluster).

    The registry and store URLs are not flags: they travel as environment variables.
    """
    argv = ["train", config.branch]
    for f in dataclasses.fields(config):
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(config, f.name)
        if value is None:
            continue  # an unset option keeps `tlreg train`'s own default
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def train_entrypoint(config: TrainConfig) -> str:
    """The shell command a job runs: ``python -m tlreg.cli train BRANCH ...``."""
    return shlex.join(["python", "-m", "tlreg.cli", *train_argv(config)])


def job_env(config: TrainConfig, home: str | os.PathLike[str]) -> tuple[dict[str, str], list[str]]:
    """The runtime_env ``env_vars`` of a job training ``config``, and the names of the
    credentials left out of them."""
    dropped: list[str] = []
    registry_url = without_password(config.registry_url)
    if registry_url != config.registry_url:
        dropped.append("registry password")
    if "://" not in config.store_url:
        # A relative store path would resolve against the job's working directory.
        store_url = str(Path(config.store_url).expanduser().absolute())
    else:
        store_url = without_password(config.store_url)
        if store_url != config.store_url:
            dropped.append("store password")
    env = {
        "TLREG_HOME": str(Path(home).expanduser().absolute()),
        "TLREG_REGISTRY_URL": registry_url,
        "TLREG_STORE_URL": store_url,
        # Without it every ray.train.report waits for Ray Train's controller poll (see
        # docs/performance.md, "Ray Train's report interval").
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1"
        ),
    }
    return env, dropped


@contextmanager
def _explicit_address() -> Iterator[None]:
    # Ray's client prefers RAY_API_SERVER_ADDRESS / RAY_ADDRESS over the address it is
    # given; hide them so that the address the user passed is the one used.
    saved = {
        k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ
    }
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(
    address: str = DEFAULT_ADDRESS,
    *,
    timeout_s: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> JobSubmissionClient:
    """A job-submission client for ``address``; raises :class:`ClusterUnreachable` within
    about ``timeout_s`` when nothing answers there.

    With token authentication on the cluster (Ray's default), the client needs
    ``RAY_AUTH_MODE=token`` and the cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
    or ``~/.ray/auth_token``), or an ``Authorization: Bearer ...`` entry in ``headers``.
    """
    import requests
    from ray.exceptions import RayError
    from ray.job_submission import JobSubmissionClient

    url = address if "://" in address else f"http://{address}"
    if urlsplit(url).scheme in ("http", "https"):
        # Ray's client has no connect timeout: probe first so that a dead address fails fast.
        try:
            requests.get(url.rstrip("/") + "/api/version", timeout=timeout_s)
        except requests.RequestException as e:
            why = (
                f"no answer in {timeout_s:g} s"
                if isinstance(e, requests.Timeout)
                else ("connection failed")
            )
            raise ClusterUnreachable(
                f"no Ray job server at {address} ({why}): start the cluster "
                "(ray start --head) or pass --address http://HEAD:8265"
            ) from None
    try:
        with _explicit_address():
            return JobSubmissionClient(url, headers=dict(headers) if headers else None)
    except (ConnectionError, RuntimeError, RayError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterUnreachable(f"Ray job server at {address} refused the client: {first}") from e


def submit_train(
    config: TrainConfig,
    *,
    address: str = DEFAULT_ADDRESS,
    home: str | os.PathLike[str],
    client: JobSubmissionClient | None = None,
) -> SubmittedJob:
    """Submit ``tlreg train`` for ``config`` to the Ray cluster at ``address``.

    ``home`` is the tlreg home the job uses (Ray Train's small result files go there). The
    caller validates the config first (branch exists, task loads): nothing is checked on the
    cluster before the job starts.
    """
    client = client or connect(address)
    env_vars, dropped = job_env(config, home)
    entrypoint = train_entrypoint(config)
    submission_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"env_vars": env_vars},
        metadata={"tlreg_branch": config.branch},
    )
    return SubmittedJob(
        submission_id=submission_id,
        address=address,
        entrypoint=entrypoint,
        env_vars=env_vars,
        dropped=tuple(dropped),
    )


def follow(
    client: JobSubmissionClient,
    submission_id: str,
    *,
    on_log: Callable[[str], None] | None = None,
    poll_s: float = 0.5,
) -> str:
    """Wait for a job to end, passing its log output to ``on_log`` as it comes; return the
    final status ("SUCCEEDED", "FAILED" or "STOPPED")."""
    if on_log is not None:
        try:
            asyncio.run(_tail(client, submission_id, on_log))
        except RuntimeError:
            pass  # the log stream dropped; the status poll below still sees the job end
    while True:
        status = client.get_job_status(submission_id)
        if status.is_terminal():
            return str(status.value)
        time.sleep(poll_s)


async def _tail(
    client: JobSubmissionClient, submission_id: str, on_log: Callable[[str], None]
) -> None:
    async for chunk in client.tail_job_logs(submission_id):
        on_log(chunk)


def failure(client: JobSubmissionClient, job: SubmittedJob, status: str) -> JobFailed:
    """The one-line error for a job that ended in ``status``, pointing to its logs."""
    message = ""
    try:
        message = (client.get_job_info(job.submission_id).message or "").strip()
    except Exception:  # the job's own message is a nicety; the status is what matters
        message = ""
    # Ray appends the log tail to the first line ("... exit code 1, last available logs
    # ...:"); the pointer to `ray job logs` below replaces it.
    first = message.splitlines()[0].split(", last available logs")[0] if message else ""
    reason = f" ({first[:200]})" if first else ""
    return JobFailed(
        f"Ray job {job.submission_id} {status}{reason}: "
        f"see ray job logs {job.submission_id} --address {job.address}"
    )
