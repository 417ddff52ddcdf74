"""`ray job submit` of the ingest job, as the README tells users to run it, against a real head with
token authentication (started by `tests/ray_head.py`, stopped by PID)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from pathlib import Path

import pytest

from pipeline.data import schema
from pipeline.demo.corpus import DemoCorpusConfig, write_demo_corpus

from ray_head import checked_ray_head

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_SECONDS = 180
MAX_UPLOAD_MIB = 5.0
"""The working dir upload is the source tree only (.gitignore keeps .venv, demo_run... out)."""


@pytest.fixture(scope="module")
def ray_head():
    with checked_ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    config = DemoCorpusConfig(ms1mv2_identities=8, ms1mv2_images=48, image_size=64)
    return write_demo_corpus(str(folder), config, sources=(schema.MS1MV2,))


def run_cli(arguments: list[str], env: dict[str, str], timeout: float
            ) -> subprocess.CompletedProcess:
    return subprocess.run(arguments, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_clients_without_the_token_are_refused(ray_head, tmp_path):
    assert ray_head.request("/api/jobs/", token=None)[0] == 401
    assert ray_head.request("/api/jobs/", token="not-the-cluster-token")[0] == 403
    assert ray_head.request("/api/jobs/")[0] == 200

    # The CLI with no token anywhere: no RAY_AUTH_* variables, and a HOME without ~/.ray/auth_token.
    result = run_cli([ray_head.ray, "job", "list", "--address", ray_head.dashboard_url],
                     env=ray_head.client_env(token=None, home=str(tmp_path)), timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(r"401|Unauthorized|[Aa]uthentication required", output), output


def test_ingest_job_runs_under_ray_job_submit(ray_head, corpus, tmp_path):
    out = tmp_path / "shards"
    submission_id = f"ingest-test-{secrets.token_hex(4)}"
    environment = ray_head.client_env()
    environment.pop("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", None)  # the default: .gitignore applies
    command = [
        ray_head.ray, "job", "submit", "--address", ray_head.dashboard_url,
        "--submission-id", submission_id, "--working-dir", str(REPO_ROOT), "--",
        "python", "-m", "jobs.ingest", schema.MS1MV2,
        "--root", corpus.source_root(schema.MS1MV2), "--out", str(out),
    ]
    try:
        result = run_cli(command, env=environment, timeout=JOB_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"job not finished after {JOB_TIMEOUT_SECONDS} s: "
                    f"{ray_head.job(submission_id)}\n{ray_head.job_logs(submission_id)}")
    output = result.stdout + result.stderr

    job = ray_head.job(submission_id)
    logs = ray_head.job_logs(submission_id)
    assert job["status"] == "SUCCEEDED", f"{job}\n--- cli ---\n{output}\n--- logs ---\n{logs}"
    assert result.returncode == 0, output

    # What arrived on the cluster: the source tree, not .venv (GBs), demo_run or .git.
    package = re.search(r"Uploading package gcs://(_ray_pkg_[0-9a-f]+)\.zip", output)
    assert package, f"no upload line in the CLI output:\n{output}"
    working_dir = ray_head.working_dir(package.group(1))
    assert (working_dir / "jobs" / "ingest.py").is_file()
    assert not {".venv", ".git", "demo_run"} & {path.name for path in working_dir.iterdir()}
    size_mib = sum(path.stat().st_size for path in working_dir.rglob("*") if path.is_file())
    size_mib /= 2**20
    assert size_mib < MAX_UPLOAD_MIB, f"{size_mib:.1f} MiB: {sorted(working_dir.iterdir())}"

    images = corpus.counts[schema.MS1MV2]
    assert re.search(rf"\[ingest {schema.MS1MV2}\] (\d+)/\1 units .*  rows {images:,}  ", logs), logs
    manifest = json.loads((out / schema.MS1MV2 / "_manifest.json").read_text())
    assert manifest["source"] == schema.MS1MV2
    assert manifest["rows"] == images
    assert sum(entry["rows"] for entry in manifest["files"]) == images
    assert manifest["skipped"] == []
