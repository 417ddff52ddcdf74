"""A real S3-compatible server on loopback for tests (moto's server mode), started and stopped by
the caller:

    with running_s3_server("fer-test") as (bucket_uri, variables):
        ...  # os.environ holds `variables` (AWS_ENDPOINT_URL, keys, region) meanwhile

The AWS_* variables are set in this process (pyarrow, s3fs and Ray workers started afterwards read
them) and restored afterwards; `variables` is the same mapping, to pass to processes that do not
inherit this environment (a `ray job submit --runtime-env-json`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

import pytest

from pipeline.data import storage

VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_s3_server(bucket: str) -> Iterator[tuple[str, dict[str, str]]]:
    moto_server = pytest.importorskip("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    saved = {key: os.environ.get(key) for key in VARIABLES}
    variables = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(variables)
    try:
        fs, _ = storage.filesystem(f"s3://{bucket}")
        fs.mkdir(bucket)
        yield f"s3://{bucket}", variables
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
