"""Real Ray nodes for tests: a token-authenticated head started with ``ray start --head --block``
and worker nodes joining it, each its own process group, stopped by the test that started them.
Never ``ray stop``: it would also stop every other Ray on the machine."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answering(url: str, process, what: str, timeout: float) -> None:
    """Until ``url`` answers an HTTP GET, while ``process`` (a server the test started) runs."""
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert process.poll() is None and time.time() < deadline, f"{what} did not start"
            time.sleep(0.5)


def cluster_env() -> dict:
    """Token authentication on, with a token handed over through the environment, so the user's
    ~/.ray/auth_token is neither read nor written."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    return env


def stop_node(process: subprocess.Popen) -> None:
    # --block: SIGTERM makes `ray start` stop exactly the processes it started. A node that ran
    # jobs can take half a minute to stop gracefully; nothing here needs that grace, so whatever
    # is left of the node's process group (its own session) after a few seconds is killed.
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def head_node(temp_dir: str, env: dict, num_cpus: int, extra: tuple = ()):
    """Yields {"address": dashboard URL for `ray job submit`, "gcs": host:port, "env": env}."""
    dashboard = f"http://127.0.0.1:{free_port()}"
    gcs_port = free_port()
    head = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={num_cpus}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", f"--temp-dir={temp_dir}",
                             # not the fixed default port: another Ray on the machine may hold it
                             f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180
        while subprocess.run(["ray", "job", "list", "--address", dashboard], env=env,
                             capture_output=True, timeout=60).returncode != 0:
            assert head.poll() is None and time.time() < deadline, "the Ray head node did not come up"
            time.sleep(2)
        yield {"address": dashboard, "gcs": f"127.0.0.1:{gcs_port}", "env": env}
    finally:
        stop_node(head)


@contextlib.contextmanager
def worker_node(gcs: str, env: dict, num_cpus: int, expected_nodes: int, temp_dir: str, extra: tuple = ()):
    # Its own temp dir, as on a machine of its own: nodes sharing one would share Ray's runtime-env
    # cache, and one node's clean-up would delete the working dir of a job running on another.
    worker = subprocess.Popen(["ray", "start", f"--address={gcs}", "--block", f"--num-cpus={num_cpus}",
                               f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                               "--disable-usage-stats", *extra], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while alive_nodes(gcs, env) < expected_nodes:
            assert worker.poll() is None and time.time() < deadline, "the worker node did not join"
            time.sleep(2)
        yield worker
    finally:
        stop_node(worker)


def alive_nodes(gcs: str, env: dict) -> int:
    script = ("import ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
              "print('ALIVE_NODES', sum(n['Alive'] for n in ray.nodes()))" % gcs)
    result = subprocess.run(["python", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    # The autoscaler's event lines ("Resized to 0 CPUs") may share stdout with the count.
    counts = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("ALIVE_NODES ")]
    return int(counts[-1]) if result.returncode == 0 and counts else 0


def submit(address: str, env: dict, working_dir: str | None, *command: str, timeout: int = 900,
           options: tuple = ()) -> subprocess.CompletedProcess:
    """`ray job submit` and wait; retried while the head's job agent is still starting."""
    shipped = ["--working-dir", working_dir] if working_dir else []
    arguments = ["ray", "job", "submit", "--address", address, *shipped, *options, "--", *command]
    deadline = time.time() + 240  # on a busy machine the agents start well after the dashboard answers
    while True:
        result = subprocess.run(arguments, env=env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in result.stdout + result.stderr or time.time() > deadline:
            return result
        time.sleep(5)
