"""The GPU check runs where the GPU machine runs it: no Ray, no S3, no TensorBoard writer, no
Optuna importable. Here on the CPU with timm's test ResNet (the same code path as on a GPU, minus
the CUDA-only figures), every phase ends without error and writes its figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_tiny_split

REPOSITORY = Path(__file__).resolve().parents[2]
ABSENT_ON_THE_GPU_MACHINE = ("ray", "s3fs", "tensorboardX", "optuna")
# Importing any of these fails in the child, as it would on the GPU machine.
LAUNCH = (f"import runpy, sys\n"
          f"for name in {ABSENT_ON_THE_GPU_MACHINE!r}: sys.modules[name] = None\n"
          f"sys.argv = sys.argv[1:]\n"
          f"runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu-check")
    split = build_tiny_split(folder)
    out = folder / "gpu_check.json"
    completed = subprocess.run(
        [sys.executable, "-c", LAUNCH, str(REPOSITORY / "bench" / "gpu_check.py"), "--split", split,
         "--out", str(out), "--tiny", "--device", "cpu", "--wire-gbps", "0.01"],
        capture_output=True, text=True, cwd=folder, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(out.read_text()), json.loads(completed.stdout[completed.stdout.index("{"):])


def test_every_phase_runs_without_ray_and_reports_its_figures(report):
    full, summary = report
    assert list(full["phases"]) == ["step", "input", "inference", "gradients"]
    assert summary["errors"] == {}
    cuda_only = {"host_syncs_per_step", "gpu_busy_fraction"}
    for name, value in summary.items():
        if name == "errors":
            continue
        if name in cuda_only:
            assert value is None, name
        else:
            assert isinstance(value, float) and math.isfinite(value), (name, value)


def test_the_step_counts_distinct_images_and_images_through_the_network(report):
    step = report[0]["phases"]["step"]
    # DTM at 8 labeled + 8 unlabeled: 16 distinct images, 24 through the network (weak + strong).
    assert step["distinct_images_per_step"] == 16
    assert step["network_images_per_step"] == 24
    views = step["views+method"]
    assert views["network_images_per_second"]["median"] == pytest.approx(
        1.5 * views["distinct_images_per_second"]["median"])
    assert step["trainer_epoch"]["steps"] == 3


def test_the_wire_emulation_charges_the_gradient_bytes(report):
    gradients = report[0]["phases"]["gradients"]
    wire = gradients["emulated_wire"]
    assert wire["wire_ms_per_step"] == pytest.approx(gradients["gradient_megabytes"] * 2**20 / 1e7 * 1000)
