"""A GCS JSON-API emulator on loopback for tests (the `gcp-storage-emulator` package), in its own
process, started and stopped by the caller:

    with running_gcs_server("fer-test") as (bucket_uri, variables):
        ...  # os.environ holds `variables` (STORAGE_EMULATOR_HOST) meanwhile

The emulator keeps its objects in memory, listens on 127.0.0.1 at a free port, and is stopped by
its process id (terminate, then kill) within a few seconds whatever the test did. While it runs,
`STORAGE_EMULATOR_HOST` points `pipeline.data.storage` (and Ray workers started afterwards, which
inherit it) at the emulator, unauthenticated; no credential is read or needed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from s3_server import free_port

VARIABLES = ("STORAGE_EMULATOR_HOST",)
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


def wait_until_serving(url: str, process: subprocess.Popen, log, timeout_s: float) -> None:
    """Poll the emulator's bucket list until it answers; fail with its output if it exits first."""
    deadline = time.monotonic() + timeout_s
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an http_proxy
    while True:
        if process.poll() is not None:
            log.seek(0)
            output = log.read().decode(errors="replace")
            raise RuntimeError(f"the GCS emulator exited with {process.returncode}:\n{output}")
        try:
            with direct.open(f"{url}/storage/v1/b", timeout=1) as answer:
                answer.read()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the GCS emulator did not answer at {url} in {timeout_s:.0f} s")
            time.sleep(0.1)


def stop(process: subprocess.Popen) -> None:
    """Stop the emulator by its process id: SIGTERM, then SIGKILL if it lingers."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_gcs_server(bucket: str) -> Iterator[tuple[str, dict[str, str]]]:
    pytest.importorskip("gcp_storage_emulator")
    pytest.importorskip("gcsfs")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Its own process: the emulator's HTTP server answers one request at a time, and in this
    # process it would compete with the test (and gcsfs's event loop) for the interpreter lock.
    # Its output goes to a file, not a pipe nobody drains (a full pipe would block it).
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
         "--port", str(port), "--in-memory", "--default-bucket", bucket, "--quiet"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    saved = {key: os.environ.get(key) for key in VARIABLES}
    variables = {"STORAGE_EMULATOR_HOST": url}
    try:
        wait_until_serving(url, process, log, START_TIMEOUT_S)
        os.environ.update(variables)
        yield f"gs://{bucket}", variables
    finally:
        stop(process)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
