"""Shared fixtures: small JPEG payloads and a local Ray for the tests marked `ray`."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def make_jpeg(seed: int = 0, size: tuple[int, int] = (112, 112), quality: int = 90) -> bytes:
    """A small JPEG with some texture (so it is not a trivially tiny file)."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = rng.integers(0, 200, 3)
    pixels = base + rng.normal(0, 25, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    return make_jpeg()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module: started once, shut down after (workers are slow to start)."""
    ray = pytest.importorskip("ray")
    from pipeline.data.ray_ingest import ensure_ray

    # Workers must import test-defined readers (by their module name, e.g. `test_ingest`, as pytest
    # imported them from their stage folder), these helpers and the package: they inherit the
    # driver's environment.
    saved = os.environ.get("PYTHONPATH")
    here = os.path.dirname(os.path.abspath(__file__))
    stage_folders = sorted(str(path) for path in Path(here).iterdir()
                           if path.is_dir() and any(path.glob("test_*.py")))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [here, *stage_folders, os.path.dirname(here)] + ([saved] if saved else []))
    ensure_ray(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Pins torch to one intra-op thread for the session: tiny models gain nothing from more, their
    spin-waits on a shared CPU made the learning checks 20x slower, and one thread is reproducible."""
    import torch  # here: `from conftest import make_jpeg` needs no torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_split(root, validation_videos: int = 1, remote: str | None = None) -> str:
    """The tiny demo corpus ingested (sequentially) and split with 4 labels per class: the
    smallest real split, for training tests. Returns the split folder. `validation_videos=2` gives
    the report half a video; `remote` (an s3:// prefix) puts the shards and the split there
    (`<remote>/shards`, `<remote>/split`), the corpus staying under `root`."""
    import dataclasses

    from pipeline.data import ingest, schema
    from pipeline.data.readers import make_reader
    from pipeline.data.split import make_split
    from pipeline.demo.corpus import PRESETS, write_demo_corpus

    write_demo_corpus(str(root / "corpus"), dataclasses.replace(PRESETS["tiny"], validation_videos=validation_videos))
    base = remote or str(root)
    for source in schema.SOURCES:
        ingest.ingest(make_reader(source, str(root / "corpus" / source)), f"{base}/shards", progress=False)
    make_split(f"{base}/shards", f"{base}/split", per_class=4, seed=0)
    return f"{base}/split"


RAY_FIXTURES = {"local_ray", "ray_head", "ray_with_dashboard"}
RAY_MARKERS = {"ray", "s3", "gcs"}


def pytest_configure(config):
    """Under pytest-xdist, one torch thread per test process (and per process it starts): two
    workers of two threads each, plus the Ray workers of the Ray group, on 2 cores is
    oversubscription, and the Ray group, the suite's long pole, pays for it."""
    # Ray Data 2.60 reads Parquet footers with up to 32 actors per read, each a Python process:
    # on 2 cores that start-up dominates the tests' small reads (one inference job: about 100 s
    # against 26 s with one). Set before any local Ray starts, so its workers and jobs inherit it.
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): the tests of a module in which
    any test uses Ray (its markers or fixtures) form one group, so they run one after another in
    one worker and share the module's Ray and fixtures. Two such modules may run at once in the two
    workers, each with its own local Ray (random ports; `ray_head` clusters stop by process group):
    one serial queue of every Ray module was the suite's long pole while the other worker idled.
    Without xdist the group mark does nothing."""
    ray_modules = {item.module.__name__ for item in items
                   if RAY_MARKERS & {mark.name for mark in item.iter_markers()}
                   or RAY_FIXTURES & set(getattr(item, "fixturenames", ()))}
    for item in items:
        if item.module.__name__ in ray_modules:
            item.add_marker(pytest.mark.xdist_group(f"ray-{item.module.__name__}"))


def pytest_sessionfinish(session, exitstatus):
    """Leave no Ray behind at interpreter exit: a job under test may have started one, and Ray
    Data's block prefetcher threads (daemons that never stop for an iterator left in mid-pass)
    must not be running while the interpreter tears down."""
    import sys
    import threading

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    for thread in threading.enumerate():
        target = getattr(thread, "_target", None)
        stop = getattr(getattr(target, "__self__", None), "stop", None)
        if thread.name == "Prefetcher" and stop is not None:
            stop()
            thread.join(timeout=5)
