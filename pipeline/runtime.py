"""Connecting to Ray: a local embedded instance on a laptop, or the cluster inside ``ray job submit``.

The runtime environment is where ``TF_USE_LEGACY_KERAS=1`` and the other TensorFlow settings of
``pipeline.TENSORFLOW_ENV`` reach every worker process before it imports TensorFlow (see
``pipeline/__init__.py`` for why tf-keras and oneDNN). Ray merges these variables
with a submitted job's own ``runtime_env``; a variable the job already sets is left to the job.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

import ray

from pipeline import TENSORFLOW_ENV, InputError, PipelineError, Stopped

WORKER_ENV_VARS = {
    **TENSORFLOW_ENV,
    # Ray Train V2 is the default in current Ray; pin it so a cluster default cannot change the API.
    "RAY_TRAIN_V2_ENABLED": "1",
    # A task or actor that asked for no GPU gets CUDA_VISIBLE_DEVICES="" again (pipeline/accelerators.py).
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1",
    # Ray Data's progress in a log (see ``log_friendly_progress``): one table a minute, not every 10 s.
    "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "60",
}


def runtime_env() -> dict:
    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if injected:
        # Inside `ray job submit`: the working dir is already on the workers' path.
        job_env = (json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {key: value for key, value in WORKER_ENV_VARS.items() if key not in job_env}
    else:
        # A local Ray's workers start from this environment, not from this process' sys.path:
        # without the checkout on PYTHONPATH, `python /repo/jobs/x.py` run from elsewhere fails there.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        env_vars = {**WORKER_ENV_VARS, "PYTHONPATH": python_path}
    return {"env_vars": env_vars} if env_vars else {}


_started_locally = False


def started_locally() -> bool:
    """Whether this process runs on an embedded Ray it started itself (one machine, sized for the
    stage), rather than on a cluster it joined."""
    return _started_locally or not ray.is_initialized()


def log_friendly_progress(attached_to_terminal: bool) -> None:
    """Ray Data's progress bars when a person watches a terminal; periodic progress lines in a
    log (``ray job logs -f``, a file). By default the Ray Data executors that run inside actors
    (the streaming split that feeds training workers) draw tqdm bars whatever their output is,
    and each redraw lands in the log: tens of kilobytes per epoch between our own progress lines.
    Without Ray's tqdm, a non-terminal output gets Ray Data's logging progress instead, every
    ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds."""
    import ray.data

    if not attached_to_terminal:
        ray.data.DataContext.get_current().use_ray_tqdm = False


def connect(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Join the cluster named by ``address`` / ``RAY_ADDRESS`` (set inside ``ray job submit``),
    or start a local embedded Ray with this machine's resources (``num_cpus``/``num_gpus``: as
    ``ray.init``, detected when None)."""
    global _started_locally
    for key, value in WORKER_ENV_VARS.items():
        os.environ.setdefault(key, value)
    log_friendly_progress(sys.stdout.isatty())
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": runtime_env(), "log_to_driver": True}
    if address:
        check_joinable(address)
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as error:
            raise PipelineError(join_failure(address, error, os.environ)) from None
    else:
        _started_locally = True
        # With the dashboard, as a Ray user expects: it also serves the State API, without which Ray
        # Train's placement-group cleaner cannot watch its controller and warns every few seconds.
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, **kwargs)
    stop_on_sigterm()


def stop_on_sigterm() -> None:
    """SIGTERM -> ``pipeline.Stopped`` in the driver. After ``ray.init``, which installs its own
    handler (``sys.exit(15)``): that would end the stage without saying what was kept."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_stopped)


def _raise_stopped(signum, frame):
    raise Stopped()


def check_address(address: str | None = None) -> str | None:
    """The cluster's GCS address (host:port) when ``address`` / ``RAY_ADDRESS`` names one and a TCP
    connect reaches it, else InputError at once: a port where nothing listens took ``ray.init``
    ~45 s of retries before "Timed out while waiting for GCS". None for a local Ray, Ray Client
    (``ray://``, whose server does the handshake) or ``auto`` with no cluster here (``ray.init``
    says so). Cheap: the CLI calls it before any other work."""
    from ray._private.services import canonicalize_bootstrap_address

    given = f"--address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address.startswith("ray://"):
        return None
    try:
        gcs_address = canonicalize_bootstrap_address(address)
    except ValueError as error:
        raise InputError(f"{given} is not a Ray cluster address ({error}): give the head's host:port "
                         f"(port 6379 unless the head was started with another), auto, or ray://host:10001") from None
    except Exception:  # noqa: BLE001 - e.g. auto with no cluster on this machine
        return None
    if not gcs_address:
        return None
    host, _, port = gcs_address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as error:
        raise InputError(f"{given}: no Ray cluster answers at {gcs_address} "
                         f"({getattr(error, 'strerror', None) or error}); start it (ray start --head) or "
                         f"correct the address") from None
    return gcs_address


def check_joinable(address: str) -> None:
    """Ask the cluster's GCS once, before ``ray.init``, whether it takes us. A refused token is
    answered at once, but ``ray.init`` retries it for ~30 s of repeated InvalidAuthToken warnings
    before a bare ConnectionError."""
    from ray._raylet import GcsClient

    gcs_address = check_address(address)
    if gcs_address:
        try:
            GcsClient(address=gcs_address)
        except (ray.exceptions.AuthenticationError, ray.exceptions.RpcError) as error:
            raise PipelineError(join_failure(address, error, os.environ)) from None


def join_failure(address: str, error: Exception, environ) -> str:
    """One line for a cluster that refused us. Clusters of current Ray are usually token-protected
    (see docs/design-notes.md, "Joining a token-protected cluster"), and Ray's client sends its
    token only if ``RAY_AUTH_MODE=token`` is set here too."""
    if isinstance(error, ray.exceptions.AuthenticationError):
        if environ.get("RAY_AUTH_MODE") != "token":
            return (f"could not join the Ray cluster at {address}: it uses token authentication; set "
                    "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token) "
                    "in this shell")
        return (f"could not join the Ray cluster at {address}: it refused this shell's token (RAY_AUTH_TOKEN, "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); use the token the cluster was started with")
    message = f"could not join the Ray cluster at {address} ({str(error).splitlines()[0] if str(error) else error})"
    if environ.get("RAY_AUTH_MODE") != "token":
        message += ("; if the cluster uses token authentication (Ray logs 'InvalidAuthToken' above), set "
                    "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token) "
                    "in this shell")
    return message

