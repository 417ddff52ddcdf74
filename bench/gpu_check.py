"""The GPU check: one command, no Ray, no network, that measures what decides whether a training
run keeps a GPU busy. It writes its JSON after every phase, so a run cut short still reports.

    python3 bench/gpu_check.py --split SPLIT --out gpu_check.json            # on a GPU (ResNet-50)
    python3 bench/gpu_check.py --split SPLIT --out gpu_check.json --tiny     # anywhere (CI smoke)

Phases (each figure is a median over timed repeats, after warm-up):
- step: the DTM step against a bare fwd+bwd+optimizer loop of the same network and images,
  method alone (views made beforehand), views + method (the Trainer's device side), and the
  Trainer's epoch with real JPEG decode; images/s counted as distinct images and as images
  through the network; on CUDA the GPU busy fraction (profiler kernel time / wall), host syncs per
  step (sync debug mode) and peak memory.
- input: JPEG decode + crop + weak view in one CPU process, and the CPU processes one GPU needs.
- inference: the evaluation network alone, `predict_rows` (CPU decode inside), and batched JPEG
  decode on the device (torchvision's nvJPEG path on CUDA).
- gradients: the overlapped average's local cost on a one-rank group (NCCL on CUDA, gloo on
  CPU), and the exposed time of an emulated wire (a sleep of bytes / bandwidth on a side stream,
  or a thread on CPU) with the reduction overlapped and serial.
- compile (with --compile): the bare loop under torch.compile.
Targets (issue 12): DTM step >= 0.9 of the bare loop and >= 3,500 network images/s on an H200,
<= 2 host syncs per step, <= 4 CPU cores per GPU for the input path, inference >= 0.9 of model-only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as functional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import schema  # noqa: E402
from pipeline.inference.predict import FrameModel, predict_rows  # noqa: E402
from pipeline.methods.base import Collectives, PendingReduction, TrainBatch, build_optimizer  # noqa: E402
from pipeline.training.config import load_config  # noqa: E402
from pipeline.training.data import read_labeled, read_validation  # noqa: E402
from pipeline.training.gradients import OverlappedGradientAverage, average_gradients  # noqa: E402
from pipeline.training.inputs import make_views  # noqa: E402
from pipeline.training.loop import Trainer  # noqa: E402


@dataclass
class Profile:
    backbone: str
    image_size: int
    batch: int
    precision: str
    channels_last: bool
    warmup: int
    steps: int
    repeats: int
    epoch_steps: int
    inference_batch: int
    inference_images: int
    input_images: int
    bucket_megabytes: float
    """The overlapped average's bucket size (the tiny network's gradients fit in one 25 MB bucket)."""


GPU = Profile(backbone="resnet50", image_size=224, batch=32, precision="bf16", channels_last=True,
              warmup=8, steps=20, repeats=3, epoch_steps=40, inference_batch=256, inference_images=4096,
              input_images=1024, bucket_megabytes=25.0)
TINY = Profile(backbone="test_resnet", image_size=32, batch=8, precision="bf16", channels_last=False,
               warmup=1, steps=2, repeats=3, epoch_steps=3, inference_batch=32, inference_images=64,
               input_images=64, bucket_megabytes=0.25)


class Clock:
    """Wall time of device work: synchronises before reading on CUDA (outside the timed code's
    own steps, which is what a throughput figure needs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def seconds_per_call(self, function: Callable[[], Any], calls: int, repeats: int) -> dict[str, float]:
        """Median and spread over `repeats` timings of `calls` calls, in seconds per call."""
        timings = []
        for _ in range(repeats):
            started = self.now()
            for _ in range(calls):
                function()
            timings.append((self.now() - started) / calls)
        return {"median": statistics.median(timings), "min": min(timings), "max": max(timings)}


def rate(images: int, timing: dict[str, float]) -> dict[str, float]:
    """Images/s from a seconds-per-call timing (median, and the range the repeats spanned)."""
    return {"median": images / timing["median"], "low": images / timing["max"], "high": images / timing["min"]}


def train_config(split: str, profile: Profile, device: torch.device, method: str, storage: str):
    return load_config(base={
        "method": method,
        "method_options": {},
        "model": {"backbone": profile.backbone, "channels_last": profile.channels_last},
        "data": {"split": split, "image_size": profile.image_size, "labeled_batch": profile.batch,
                 "unlabeled_ratio": 1, "shuffle_buffer": 4 * profile.batch},
        "evaluation": {"batch_size": profile.inference_batch},
        "run": {"name": "gpu-check", "storage": storage, "epochs": 1000,
                "steps_per_epoch": profile.epoch_steps, "precision": profile.precision,
                "device": device.type, "log_every_steps": 0},
    })


def device_batch(trainer: Trainer, profile: Profile) -> TrainBatch:
    """One step's batch made by the Trainer's own input pipeline (real decode), kept for reuse."""
    indices = trainer.sampler.indices(0)[:profile.batch]
    batch, _, _ = trainer.inputs.next(indices, None)
    return batch


# ------------------------------------------------------------------------------- phases

def phase_step(split: str, profile: Profile, device: torch.device, storage: str) -> dict[str, Any]:
    clock = Clock(device)
    trainer = Trainer(train_config(split, profile, device, "dtm", storage), run_folder=storage,
                      save_checkpoints=False, device=device)
    method = trainer.method
    batch = device_batch(trainer, profile)
    distinct = len(batch.labels) + len(batch.unlabeled_weak)
    through = method.forward_images(batch)

    # The bare loop: the same network, optimizer, precision and number of images, nothing else.
    network = method.context.create_model()
    optimizer = build_optimizer(network.parameters(), trainer.config.optimizer)
    images = torch.cat([batch.labeled_weak, batch.unlabeled_weak, batch.unlabeled_strong])
    labels = torch.randint(0, schema.NUM_CLASSES, (len(images),), device=device)

    def bare() -> None:
        with method.autocast():
            logits = network(method.prepare(images)).float()
        loss = functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_number = iter(range(10**9))
    alone = lambda: method.train_step(batch, next(step_number))
    cpu_batch = trainer.inputs._prepare(trainer.sampler.indices(0)[:profile.batch])
    with_views = lambda: method.train_step(trainer.inputs.to_device(cpu_batch), next(step_number))

    for function in (bare, alone, with_views):
        for _ in range(profile.warmup):
            function()
    timings: dict[str, dict[str, float]] = {name: {"runs": []} for name in ("bare", "method", "views+method")}
    for _ in range(profile.repeats):  # interleaved, so drift hits every variant alike
        for name, function in (("bare", bare), ("method", alone), ("views+method", with_views)):
            timings[name]["runs"].append(clock.seconds_per_call(function, profile.steps, 1)["median"])
    result: dict[str, Any] = {"distinct_images_per_step": distinct, "network_images_per_step": through}
    for name, timing in timings.items():
        runs = timing["runs"]
        summary = {"median": statistics.median(runs), "min": min(runs), "max": max(runs)}
        result[name] = {"seconds_per_step": summary, "network_images_per_second": rate(through, summary),
                        "distinct_images_per_second": rate(distinct, summary)}
    bare_median = result["bare"]["seconds_per_step"]["median"]
    for name in ("method", "views+method"):
        result[name]["ratio_to_bare"] = bare_median / result[name]["seconds_per_step"]["median"]

    # The Trainer's epoch, real decode in its background thread: one warm-up epoch, one timed.
    trainer.train_epoch()
    trainer.epoch += 1
    totals = trainer.train_epoch()
    result["trainer_epoch"] = {
        "steps": totals.steps, "seconds": totals.seconds,
        "distinct_images_per_second": totals.images / totals.seconds,
        "network_images_per_second": totals.forward_images / totals.seconds,
        "input_wait_fraction": totals.input_seconds / totals.seconds,
        "ratio_to_bare": (totals.forward_images / totals.seconds) / (through / bare_median),
    }
    if device.type == "cuda":
        result.update(cuda_step_details(trainer, cpu_batch, with_views, profile))
    trainer.inputs.close()
    return result


def cuda_step_details(trainer: Trainer, cpu_batch: Any, step: Callable[[], Any], profile: Profile
                      ) -> dict[str, Any]:
    """Host syncs per step (CUDA's sync debug mode warns at each), GPU busy fraction (kernel time
    over wall time under the profiler), peak memory."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(profile.steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(warning.message) for warning in caught if "synchroniz" in str(warning.message).lower()]
    from torch.profiler import ProfilerActivity, profile as profiler
    torch.cuda.synchronize()
    with profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as recorded:
        started = time.perf_counter()
        for _ in range(profile.steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernel_microseconds = sum(getattr(event, "self_device_time_total", 0.0) for event in recorded.key_averages()
                              if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA)
    return {"host_syncs_per_step": len(syncs) / profile.steps, "sync_examples": syncs[:5],
            "gpu_busy_fraction": min(1.0, kernel_microseconds / 1e6 / wall),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def phase_input(split: str, profile: Profile, step_result: dict[str, Any] | None) -> dict[str, Any]:
    """Decode + crop + weak view on one CPU thread: the work one input process does per image."""
    table = read_labeled(split)
    count = min(profile.input_images, 50 * len(table))
    images = table.take_images(np.arange(count) % len(table))
    weak, _ = make_views(load_config(base={"data": {"split": split, "image_size": profile.image_size}}).data)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def one_pass() -> None:
            for start in range(0, count, profile.batch):
                pixels, ok = weak.decode(images[start:start + profile.batch])
                weak(torch.from_numpy(weak.geometry(pixels[ok], rng)), generator)

        one_pass()
        timing = Clock(torch.device("cpu")).seconds_per_call(one_pass, 1, profile.repeats)
    finally:
        torch.set_num_threads(threads)
    per_process = rate(count, timing)
    result = {"images": count, "decode_and_weak_view_images_per_second_per_process": per_process}
    if step_result:
        needed = step_result["views+method"]["distinct_images_per_second"]["median"]
        result["cpu_processes_per_gpu"] = needed / per_process["median"]
    return result


def phase_inference(split: str, profile: Profile, device: torch.device, storage: str) -> dict[str, Any]:
    clock = Clock(device)
    trainer = Trainer(train_config(split, profile, device, "dtm", storage), run_folder=storage,
                      save_checkpoints=False, device=device)
    trainer.inputs.close()
    model = FrameModel(method=trainer.method, config=trainer.config, checkpoint="", epoch=0)
    network = model.network.eval()
    validation = read_validation(split)
    images = validation.take_images(np.arange(profile.inference_images) % len(validation))
    table = pa.table({schema.SAMPLE_ID: [f"row-{index}" for index in range(len(images))],
                      schema.IMAGE: pa.array(images, pa.binary())})
    batch = profile.inference_batch
    pixels = torch.randn(batch, 3, profile.image_size, profile.image_size, device=device)

    @torch.no_grad()
    def model_only() -> None:
        with model.method.autocast():
            network(model.method.prepare(pixels))

    def with_decode() -> None:
        for start in range(0, table.num_rows, batch):
            predict_rows(model, table.slice(start, batch))

    encoded = [torch.frombuffer(bytearray(image), dtype=torch.uint8) for image in images[:batch]]

    def device_decode() -> None:
        import torchvision.io as io
        decoded = io.decode_jpeg(encoded, device=device)
        stacked = torch.stack([functional.interpolate(image[None].float(), size=(profile.image_size,) * 2,
                                                      mode="bilinear", antialias=True)[0]
                               for image in decoded])
        stacked.sum()

    model_only(); with_decode(); device_decode()  # noqa: E702 (warm-up)
    model_rate = rate(batch, clock.seconds_per_call(model_only, max(1, profile.steps // 2), profile.repeats))
    predict_rate = rate(table.num_rows, clock.seconds_per_call(with_decode, 1, profile.repeats))
    decode_rate = rate(batch, clock.seconds_per_call(device_decode, max(1, profile.steps // 2), profile.repeats))
    return {"model_only_images_per_second": model_rate,
            "predict_rows_images_per_second": predict_rate,
            "predict_rows_ratio_to_model_only": predict_rate["median"] / model_rate["median"],
            "device_jpeg_decode_images_per_second": decode_rate}


class EmulatedWire(Collectives):
    """A one-worker 'all-reduce' that takes bytes / bandwidth: a sleep kernel on a side stream on
    CUDA (calibrated), a sleeping thread on CPU. `overlapped=False` makes every reduction block
    where it is started, as the plain post-backward average does."""

    world_size = 1

    def __init__(self, device: torch.device, gigabytes_per_second: float) -> None:
        self.device, self.bandwidth = device, gigabytes_per_second * 1e9
        self.overlapped = True
        if device.type == "cuda":
            self.stream = torch.cuda.Stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); torch.cuda._sleep(10_000_000); end.record()  # noqa: E702
            torch.cuda.synchronize()
            self.cycles_per_second = 10_000_000 / (start.elapsed_time(end) / 1000)
        else:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def seconds(self, tensor: torch.Tensor) -> float:
        return tensor.numel() * tensor.element_size() / self.bandwidth

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum_async(tensor.clone()).wait()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(tensor) / self.world_size

    def all_reduce_sum_async(self, tensor: torch.Tensor) -> PendingReduction:
        seconds = self.seconds(tensor)
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                torch.cuda._sleep(int(seconds * self.cycles_per_second))
            wire = self.stream
            arrived = _Waiter(lambda: current.wait_stream(wire))  # orders, does not block the host
        else:
            future = self.pool.submit(time.sleep, seconds)
            arrived = _Waiter(future.result)
        pending = PendingReduction(tensor, arrived)
        if not self.overlapped:
            pending.wait()
        return pending


class _Waiter:
    """The `work` of a PendingReduction: `wait()` calls `function`."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self.wait = function


def phase_gradients(profile: Profile, device: torch.device, wire_gigabytes_per_second: float) -> dict[str, Any]:
    import torch.distributed as dist
    from pipeline.core.models import ModelConfig, create_model
    from pipeline.methods.base import OptimizerConfig
    from pipeline.training.distributed import TorchCollectives

    clock = Clock(device)
    model_config = ModelConfig(backbone=profile.backbone, channels_last=profile.channels_last)
    network = create_model(model_config).to(device)
    if profile.channels_last:
        network = network.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(network.parameters(), OptimizerConfig(lr=1e-4))
    images = torch.randn(3 * profile.batch, 3, profile.image_size, profile.image_size, device=device)
    if profile.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, schema.NUM_CLASSES, (len(images),), device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if profile.precision == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            logits = network(images).float()
        optimizer.zero_grad(set_to_none=True)
        functional.cross_entropy(logits, labels).backward()
        optimizer.step()

    gradient_bytes = sum(parameter.numel() * 4 for parameter in network.parameters())
    wire = EmulatedWire(device, wire_gigabytes_per_second)
    folder = tempfile.mkdtemp(prefix="gpu-check-group-")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{folder}/store", rank=0, world_size=1)
    group = TorchCollectives()

    def overlapped(collectives: Collectives) -> Callable[[], Callable[[], None]]:
        def install() -> Callable[[], None]:
            wire.overlapped = True
            return OverlappedGradientAverage(optimizer, collectives, profile.bucket_megabytes).remove
        return install

    def plain(collectives: Collectives, serial: bool = False) -> Callable[[], Callable[[], None]]:
        def install() -> Callable[[], None]:
            wire.overlapped = not serial
            return optimizer.register_step_pre_hook(
                lambda *_: average_gradients(list(network.parameters()), collectives)).remove
        return install

    variants = {"no_reduction": lambda: (lambda: None),
                "overlapped_one_rank": overlapped(group), "plain_one_rank": plain(group),
                "wire_overlapped": overlapped(wire), "wire_serial": plain(wire, serial=True)}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(profile.repeats):  # interleaved rounds: drift hits every variant alike
            for name, install in variants.items():
                remove = install()
                for _ in range(profile.warmup):
                    step()
                runs[name].append(clock.seconds_per_call(step, profile.steps, 1)["median"])
                remove()
    finally:
        dist.destroy_process_group()
    timings = {name: {"median": statistics.median(values), "min": min(values), "max": max(values)}
               for name, values in runs.items()}
    base = timings["no_reduction"]["median"]
    exposed = {name: 1000 * (timing["median"] - base) for name, timing in timings.items()}
    return {"gradient_megabytes": gradient_bytes / 2**20, "seconds_per_step": timings,
            "local_cost_ms": {name: exposed[name] for name in ("overlapped_one_rank", "plain_one_rank")},
            "emulated_wire": {"gigabytes_per_second": wire_gigabytes_per_second,
                              "wire_ms_per_step": 1000 * gradient_bytes / wire.bandwidth,
                              "overlapped": {"exposed_ms": exposed["wire_overlapped"]},
                              "serial": {"exposed_ms": exposed["wire_serial"]}}}


def phase_compile(profile: Profile, device: torch.device) -> dict[str, Any]:
    from pipeline.core.models import ModelConfig, create_model
    from pipeline.methods.base import OptimizerConfig

    clock = Clock(device)
    network = create_model(ModelConfig(backbone=profile.backbone, channels_last=profile.channels_last)).to(device)
    optimizer = build_optimizer(network.parameters(), OptimizerConfig(lr=1e-4))
    compiled = torch.compile(network)
    images = torch.randn(3 * profile.batch, 3, profile.image_size, profile.image_size, device=device)
    labels = torch.randint(0, schema.NUM_CLASSES, (len(images),), device=device)

    def make(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = model(images).float()
            optimizer.zero_grad(set_to_none=True)
            functional.cross_entropy(logits, labels).backward()
            optimizer.step()
        return step

    result = {}
    for name, model in (("eager", network), ("compiled", compiled)):
        step = make(model)
        started = time.perf_counter()
        for _ in range(profile.warmup):
            step()
        warm_seconds = time.perf_counter() - started
        result[name] = {"warmup_seconds": warm_seconds,
                        "network_images_per_second": rate(len(images),
                                                          clock.seconds_per_call(step, profile.steps, profile.repeats))}
    return result


# ------------------------------------------------------------------------------- driver

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", required=True, help="a split folder made here (demo or test corpus)")
    parser.add_argument("--out", required=True, help="the JSON file, rewritten after every phase")
    parser.add_argument("--tiny", action="store_true", help="timm's test ResNet at 32 px: proves the check runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--phases", default="step,input,inference,gradients",
                        help="comma-separated, from step, input, inference, gradients, compile")
    parser.add_argument("--wire-gbps", type=float, default=25.0,
                        help="emulated all-reduce bus bandwidth, GB/s (about 25 over PCIe, 400 NVLink)")
    arguments = parser.parse_args(argv)
    device = torch.device("cuda" if arguments.device == "auto" and torch.cuda.is_available()
                          else "cpu" if arguments.device == "auto" else arguments.device)
    profile = TINY if arguments.tiny else GPU
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "profile": vars(profile), "arguments": vars(arguments), "phases": {},
    }

    def write() -> None:
        temporary = arguments.out + ".partial"
        with open(temporary, "w") as handle:
            json.dump(report, handle, indent=2, default=str)
        os.replace(temporary, arguments.out)

    write()
    storage = tempfile.mkdtemp(prefix="gpu-check-runs-")
    phases = {
        "step": lambda: phase_step(arguments.split, profile, device, storage),
        "input": lambda: phase_input(arguments.split, profile, report["phases"].get("step")),
        "inference": lambda: phase_inference(arguments.split, profile, device, storage),
        "gradients": lambda: phase_gradients(profile, device, arguments.wire_gbps),
        "compile": lambda: phase_compile(profile, device),
    }
    failed = False
    for name in [part.strip() for part in arguments.phases.split(",") if part.strip()]:
        if name not in phases:
            parser.error(f"unknown phase {name!r}; known: {', '.join(phases)}")
        started = time.perf_counter()
        try:
            report["phases"][name] = phases[name]()
        except Exception as error:  # one failing phase must not cost the others' figures
            failed = True
            report["phases"][name] = {"error": f"{type(error).__name__}: {error}",
                                      "traceback": traceback.format_exc()}
        report["phases"][name]["phase_seconds"] = time.perf_counter() - started
        write()
        print(f"[gpu_check] {name}: {time.perf_counter() - started:.1f} s", flush=True)
    print(json.dumps(summary(report), indent=2))
    return 1 if failed else 0


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the issue's targets name, pulled out of the full report."""
    phases = report["phases"]
    pick = lambda *keys: _dig(phases, keys)
    return {
        "dtm_step_ratio_to_bare": pick("step", "views+method", "ratio_to_bare"),
        "dtm_network_images_per_second": pick("step", "views+method", "network_images_per_second", "median"),
        "trainer_epoch_ratio_to_bare": pick("step", "trainer_epoch", "ratio_to_bare"),
        "host_syncs_per_step": pick("step", "host_syncs_per_step"),
        "gpu_busy_fraction": pick("step", "gpu_busy_fraction"),
        "cpu_processes_per_gpu": pick("input", "cpu_processes_per_gpu"),
        "inference_ratio_to_model_only": pick("inference", "predict_rows_ratio_to_model_only"),
        "exposed_ms_overlapped": pick("gradients", "emulated_wire", "overlapped", "exposed_ms"),
        "exposed_ms_serial": pick("gradients", "emulated_wire", "serial", "exposed_ms"),
        "errors": {name: phase["error"] for name, phase in phases.items() if "error" in phase},
    }


def _dig(value: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


if __name__ == "__main__":
    sys.exit(main())
