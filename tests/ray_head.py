"""A real Ray head for tests: `ray start --head --block` with token auth, in its own process group,
ports and temp dir, stopped by PID at the end (never `ray stop`: it kills every Ray on the host).

    with running_ray_head(num_cpus=2) as head:
        subprocess.run([head.ray, "job", "submit", "--address", head.dashboard_url, ...],
                       env=head.client_env())
        with running_ray_worker(head, num_cpus=2):  # a node joining later (a cold cluster grows)
            ...

The head gets a token generated here through `RAY_AUTH_TOKEN` (highest precedence in Ray's token
lookup), so `~/.ray/auth_token`, which other processes on the host may use, is neither read nor
written. `python` in a job entrypoint resolves through the head's PATH, which starts with this
interpreter's bin folder (the venv).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import pytest

AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
STARTED_MESSAGE = "Ray runtime started."
TERMINAL_JOB_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def free_ports(count: int) -> list[int]:
    """Ports the kernel reports free, distinct (all sockets are held until every port is chosen)."""
    sockets = []
    try:
        for _ in range(count):
            handle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            handle.bind(("127.0.0.1", 0))
            sockets.append(handle)
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def venv_bin() -> Path:
    """The folder of this interpreter's scripts (`.venv/bin` under `make test`); not resolved,
    because the venv's `python` is a symlink to the system one."""
    return Path(sys.executable).parent


def _base_env() -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in AUTH_VARIABLES and key != "RAY_ADDRESS"}
    environment["PATH"] = f"{venv_bin()}{os.pathsep}{os.environ.get('PATH', '')}"
    environment["RAY_USAGE_STATS_ENABLED"] = "0"  # no network calls from a test cluster
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def _launch(command: list[str], environment: dict[str, str], temp_dir: str) -> tuple[subprocess.Popen, str]:
    """`ray start ... --block` in its own session (so its whole process group can be stopped),
    its output in `<temp_dir>/ray-start.log`; returns the process and the log's path."""
    log_path = os.path.join(temp_dir, "ray-start.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return process, log_path


@dataclass
class RayHead:
    process: subprocess.Popen
    token: str
    dashboard_url: str
    gcs_address: str
    temp_dir: str
    log_path: str
    ray: str
    """The `ray` executable that started the head (use it for clients too)."""
    descendants: set[psutil.Process] = field(default_factory=set)

    def client_env(self, token: str | None = "", home: str | None = None) -> dict[str, str]:
        """Environment for a client process: the head's token by default; `token=None` gives one
        with no token at all (and `home`, if given, replaces HOME so `~/.ray/auth_token` of the
        host is not found either)."""
        environment = _base_env()
        if token is not None:
            environment["RAY_AUTH_MODE"] = "token"
            environment["RAY_AUTH_TOKEN"] = token or self.token
        if home is not None:
            environment["HOME"] = home
        return environment

    def request(self, path: str, token: str | None = "", timeout: float = 10.0
                ) -> tuple[int, str]:
        """GET `path` from the dashboard; (status, body). `token=None` sends no credentials."""
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        request = urllib.request.Request(self.dashboard_url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode("utf-8", "replace")

    def job(self, submission_id: str) -> dict:
        status, body = self.request(f"/api/jobs/{submission_id}")
        if status != 200:
            raise RuntimeError(f"GET /api/jobs/{submission_id}: {status} {body[:500]}")
        return json.loads(body)

    def job_logs(self, submission_id: str) -> str:
        status, body = self.request(f"/api/jobs/{submission_id}/logs")
        if status != 200:
            raise RuntimeError(f"GET /api/jobs/{submission_id}/logs: {status} {body[:500]}")
        return json.loads(body)["logs"]

    def wait_for_success(self, submission_id: str, timeout: float, env: dict[str, str]) -> str:
        """Waits for a submitted job to end and returns its logs; fails the test (after stopping the
        job, so it does not outlive the test) when it has not ended within `timeout` seconds, or
        when it ended in any state but SUCCEEDED."""
        deadline = time.monotonic() + timeout
        job = self.job(submission_id)
        while job["status"] not in TERMINAL_JOB_STATES and time.monotonic() < deadline:
            time.sleep(2.0)
            job = self.job(submission_id)
        logs = self.job_logs(submission_id)
        if job["status"] not in TERMINAL_JOB_STATES:
            subprocess.run([self.ray, "job", "stop", "--address", self.dashboard_url, submission_id],
                           env=env, capture_output=True, text=True, timeout=60)
            pytest.fail(f"job not finished after {timeout} s: {job}\n--- logs ---\n{logs}")
        assert job["status"] == "SUCCEEDED", f"{job}\n--- logs ---\n{logs}"
        return logs

    def working_dir(self, package: str) -> Path:
        """Where this (single-node) cluster unpacked an uploaded `_ray_pkg_<hash>` working dir."""
        return Path(self.temp_dir, "session_latest", "runtime_resources", "working_dir_files",
                    package)

    def log_tail(self, characters: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as handle:
                return handle.read()[-characters:]
        except OSError:
            return ""

    def remember_descendants(self) -> None:
        """Record every process started under the head (workers come and go), so teardown can
        find any that left the process group. psutil.Process objects carry their start time, so
        a PID the kernel hands to someone else later is never mistaken for ours."""
        with contextlib.suppress(psutil.Error):
            self.descendants.update(psutil.Process(self.process.pid).children(recursive=True))

    def leftovers(self) -> list[int]:
        """PIDs of this head's processes still running (none after `stop`)."""
        running = {process.pid for process in self.descendants if _running(process)}
        return sorted(running | set(_group_members(self.process.pid)))

    def stop(self, grace_seconds: float = 20.0) -> list[int]:
        """SIGTERM the process group started here, wait, SIGKILL what is left of it; then kill
        any recorded descendant still running. Returns the PIDs that needed SIGKILL."""
        self.remember_descendants()
        group = self.process.pid  # start_new_session=True: `ray start` leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and (self.process.poll() is None
                                               or _group_members(group)):
            time.sleep(0.2)
        forced = _group_members(group)
        if forced:  # the group still has members, so its ID cannot have been reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        survivors = [process for process in self.descendants if _running(process)]
        for process in survivors:
            with contextlib.suppress(psutil.Error):
                process.kill()
                forced.append(process.pid)
        psutil.wait_procs(survivors, timeout=10)
        return forced


def _running(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    return False


def _group_members(group: int) -> list[int]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == group and _running(process):
                members.append(process.pid)
    return members


def start_ray_head(num_cpus: int = 2, object_store_mb: int = 300, timeout: float = 90.0,
                   extra_env: dict[str, str] | None = None) -> RayHead:
    """Start a head and wait until its job API answers an authenticated request."""
    ray = venv_bin() / "ray"
    ray_executable = str(ray) if ray.exists() else shutil.which("ray")
    if not ray_executable:
        raise RuntimeError(f"no `ray` executable next to {sys.executable} or on PATH")
    # Short: Ray puts Unix sockets under <temp dir>/session_<date>/sockets (~107 chars max).
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    gcs_port, dashboard_port, agent_port, client_port = free_ports(4)
    token = secrets.token_hex(32)
    environment = _base_env()
    environment.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        # SIGTERM makes the head drain first (30 s by default); a test cluster has nothing to drain.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    })
    environment.update(extra_env or {})
    command = [
        ray_executable, "start", "--head", "--block",
        f"--port={gcs_port}", f"--dashboard-port={dashboard_port}",
        "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
        # Fixed by default (52365, 10001): another cluster on the host would collide.
        f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--object-store-memory={object_store_mb << 20}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    process, log_path = _launch(command, environment, temp_dir)
    head = RayHead(process, token, f"http://127.0.0.1:{dashboard_port}",
                   f"127.0.0.1:{gcs_port}", temp_dir, log_path, ray_executable)
    try:
        _wait_ready(head, timeout)
    except BaseException:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    head.remember_descendants()
    return head


def _wait_ready(head: RayHead, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            raise RuntimeError(f"`ray start` exited with {head.process.returncode}:\n"
                               f"{head.log_tail()}")
        # The job API answers before the raylet is up; `ray start` says when everything is.
        if STARTED_MESSAGE in head.log_tail(100_000):
            try:
                status, body = head.request("/api/jobs/", timeout=2.0)
                if status == 200:
                    return
                last = f"{status} {body[:200]}"
            except (OSError, urllib.error.URLError) as error:
                last = repr(error)
        time.sleep(0.25)
    raise TimeoutError(f"Ray head's job API not ready after {timeout:.0f} s ({last}):\n"
                       f"{head.log_tail()}")


@contextlib.contextmanager
def running_ray_head(**options) -> Iterator[RayHead]:
    """`start_ray_head(**options)`, stopped and its temp dir removed on exit."""
    head = start_ray_head(**options)
    try:
        yield head
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)


@dataclass
class RayWorker:
    """A worker node joined to a test head, in its own process group, ports and temp dir."""

    process: subprocess.Popen
    temp_dir: str
    log_path: str
    descendants: set[psutil.Process] = field(default_factory=set)

    # The head's process-group teardown, unchanged: it needs only `process`, `descendants` and
    # `log_path`, which a worker has too.
    log_tail = RayHead.log_tail
    remember_descendants = RayHead.remember_descendants
    leftovers = RayHead.leftovers
    stop = RayHead.stop


def start_ray_worker(head: RayHead, num_cpus: int = 2, object_store_mb: int = 200,
                     timeout: float = 90.0, extra_env: dict[str, str] | None = None) -> RayWorker:
    """Join a worker node to `head` (`ray start --address <gcs> --block` with the head's token)
    and wait until `ray start` says the node is up (jobs see its CPUs in `ray.cluster_resources()`
    shortly after)."""
    temp_dir = tempfile.mkdtemp(prefix="rw", dir="/tmp")
    agent_port, = free_ports(1)
    environment = _base_env()
    environment.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token,
                        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
    environment.update(extra_env or {})
    command = [
        head.ray, "start", f"--address={head.gcs_address}", "--block",
        "--node-ip-address=127.0.0.1",
        # 52365 by default, which the head (or another test cluster) may hold.
        f"--dashboard-agent-listen-port={agent_port}",
        f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--object-store-memory={object_store_mb << 20}",
        f"--temp-dir={temp_dir}", "--disable-usage-stats",
    ]
    process, log_path = _launch(command, environment, temp_dir)
    worker = RayWorker(process, temp_dir, log_path)
    try:
        deadline = time.monotonic() + timeout
        while STARTED_MESSAGE not in worker.log_tail(100_000):
            if process.poll() is not None:
                raise RuntimeError(f"`ray start --address` exited with {process.returncode}:\n"
                                   f"{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Ray worker node not started after {timeout:.0f} s:\n"
                                   f"{worker.log_tail()}")
            time.sleep(0.25)
    except BaseException:
        worker.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    worker.remember_descendants()
    return worker


@contextlib.contextmanager
def running_ray_worker(head: RayHead, **options) -> Iterator[RayWorker]:
    """`start_ray_worker(head, **options)`, stopped and its temp dir removed on exit."""
    worker = start_ray_worker(head, **options)
    try:
        yield worker
    finally:
        worker.stop()
        shutil.rmtree(worker.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def checked_ray_head(num_cpus: int = 2):
    """`running_ray_head`, then check that it left no process behind and did not touch the
    host's shared `~/.ray/auth_token` (other Ray users on the host read it)."""
    shared_token = Path.home() / ".ray" / "auth_token"
    token_before = shared_token.read_bytes() if shared_token.exists() else None
    with running_ray_head(num_cpus=num_cpus) as head:
        yield head
    assert head.leftovers() == [], "processes of the test head still running"
    if token_before is not None:
        assert shared_token.read_bytes() == token_before, "~/.ray/auth_token was overwritten"
