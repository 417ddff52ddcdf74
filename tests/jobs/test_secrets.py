"""No secret leaves the environment it was given in: a job run with a recognisable fake AWS secret
key leaves it in no output, manifest, metrics file, checkpoint or Ray log, and not in Ray's
runtime environment (where the dashboard and the job table show it), while the job's Ray workers
still inherit it (they need it to reach S3). Also: the local dashboard listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import build_tiny_split

pytestmark = pytest.mark.ray
REPOSITORY = Path(__file__).resolve().parents[2]

# One Ray for the whole script: the driver of a job as `ray job submit` or `make demo` runs it.
SCRIPT = r"""
import json, os, sys
import ray
import psutil
from pipeline.data.ray_ingest import ensure_ray
from jobs import ingest, train

out, corpus, split = sys.argv[1:4]
ensure_ray(dashboard=True)

@ray.remote(num_cpus=0)
def worker_has(value):
    return os.environ.get("AWS_SECRET_ACCESS_KEY") == value  # compared there: never printed

url = ray.get_runtime_context().worker.node.address_info.get("webui_url")
port = int(url.rsplit(":", 1)[1])
listening = []  # every address this machine's processes listen on at the dashboard's port
for connection in psutil.net_connections("inet"):
    if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
        listening.append(connection.laddr.ip)
report = {"runtime_env": ray.get_runtime_context().runtime_env,
          "worker_has_secret": ray.get(worker_has.remote(os.environ["AWS_SECRET_ACCESS_KEY"])),
          "dashboard_url": url, "dashboard_listening": sorted(set(listening))}
assert ingest.main(["ms1mv2", "--root", corpus, "--out", out + "/shards"]) == 0
assert train.main(["--config", "jobs/recipes/demo_abaw5_dtm.yaml",
                   "--set", f"data.split={split}", "--set", f"run.storage={out}/runs",
                   "--set", "model.backbone=test_resnet", "--set", "model.channels_last=false",
                   "--set", "data.labeled_batch=8", "--set", "data.shuffle_buffer=32",
                   "--set", "run.epochs=1", "--set", "run.steps_per_epoch=2",
                   "--set", "scaling.num_workers=1", "--set", "scaling.cpus_per_worker=0.5",
                   "--set", "evaluation.windows=[5]"]) == 0
print("REPORT " + json.dumps(report, default=str))
ray.shutdown()
"""


def files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a socket or a file removed meanwhile
                continue
    return found


def test_a_job_leaves_the_secret_nowhere_and_the_dashboard_is_local(tmp_path):
    secret = f"fakeSecretKey{uuid.uuid4().hex}"
    split = build_tiny_split(tmp_path)
    ray_temp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's socket paths
    out = tmp_path / "out"
    environment = {**os.environ, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIAFAKETESTKEY",
                   "RAY_TMPDIR": str(ray_temp), "PYTHONPATH": str(REPOSITORY)}
    environment.pop("RAY_ADDRESS", None)
    try:
        finished = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(out), str(tmp_path / "corpus" / "ms1mv2"), split],
            cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=600)
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        report = json.loads(next(line for line in finished.stdout.splitlines()
                                 if line.startswith("REPORT "))[len("REPORT "):])
        assert secret not in json.dumps(report["runtime_env"])
        assert report["worker_has_secret"] is True  # inherited, so S3 still works in the workers
        assert report["dashboard_listening"] and set(report["dashboard_listening"]) == {"127.0.0.1"}
        assert report["dashboard_url"].startswith("127.0.0.1:")
        assert secret not in finished.stdout + finished.stderr
        # The job wrote shards, a manifest, metrics and checkpoints; Ray wrote its session logs.
        assert list((out / "shards" / "ms1mv2").glob("*.parquet"))
        assert list((out / "runs").rglob("*.pt")) and list((out / "runs").rglob("metrics.jsonl"))
        assert list(ray_temp.rglob("*.log")) or list(ray_temp.rglob("*.out"))
        assert files_holding(out, secret.encode()) == []
        assert files_holding(ray_temp, secret.encode()) == []
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)
