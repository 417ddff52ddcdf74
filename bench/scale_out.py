"""The scale-out plan's arithmetic: from named anchors to every table of docs/scale-out.md.

Pure arithmetic (no Ray, no torch). Each anchor says how it is known (measured here, measured on a
GPU and published, a vendor specification or list price, or assumed) and where from; every table
ends with the anchors it read. Change an anchor and recompute:

    python bench/scale_out.py                                 # print every table
    python bench/scale_out.py --table summary                 # one of them
    python bench/scale_out.py --set H100_OVER_A100=2.0        # the same with another anchor value
    python bench/scale_out.py --check docs/scale-out.md       # exit 1 when the doc's tables differ
    python bench/scale_out.py --write docs/scale-out.md       # rewrite the doc's tables in place
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

MEASURED_HERE = "measured here"
MEASURED_ON_GPU = "measured on a GPU"
PUBLISHED = "published"
ASSUMED = "assumed"
KINDS = (MEASURED_HERE, MEASURED_ON_GPU, PUBLISHED, ASSUMED)
"""measured here: on this project's 2-vCPU VM (no GPU). measured on a GPU: a published measurement
by someone else. published: a vendor specification, a list price, a dataset's published size or
a default read from a pinned library's source. assumed: a judgement, with the reason given."""


@dataclass(frozen=True)
class Anchor:
    value: Any
    """A number, or a tuple of numbers (gradient buckets)."""
    unit: str
    kind: str
    source: str

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"anchor kind {self.kind!r} is not one of {KINDS}")
        if not self.source.strip():
            raise ValueError("an anchor needs a source")


# ------------------------------------------------------------------------------- GPU speed

RESNET50_A100_BF16_IMAGES_PER_SECOND = Anchor(
    2470, "images/s", MEASURED_ON_GPU,
    "NVIDIA/DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, 'Training "
    "performance: NVIDIA DGX A100 (8x A100 80GB)': 1 GPU, mixed precision, DALI input, "
    "pytorch-21.03 container (fp16 autocast; bf16 uses the same tensor cores at the same rate)")
RESNET50_A100_TF32_IMAGES_PER_SECOND = Anchor(
    938, "images/s", MEASURED_ON_GPU, "same table, TF32 column (the fp32 recipes train in TF32)")
H100_OVER_A100 = Anchor(
    1.5, "x", ASSUMED,
    "H100 SXM over A100 for this eager PyTorch step of 96 images; tuned stacks show about 2.0 "
    "(MLPerf v3.0 DGX H100: 7,006 images/s per GPU, below; NVIDIA's MXNet ResNet-50 on DGX A100: 90 "
    "epochs in 1.14 h on 8 GPUs, about 3,500 per GPU, catalog.ngc.nvidia.com resnet_mxnet "
    "performance), small batches and a Python-driven step take less of the gain")
RESNET50_H100_MLPERF_IMAGES_PER_SECOND = Anchor(
    7006, "images/s", MEASURED_ON_GPU,
    "mlcommons/training_results_v3.0, NVIDIA/results/dgxh100_ngc23.04_mxnet/resnet/result_0.txt: "
    "tracked throughput about 56,050 images/s on one DGX H100 (8 GPUs; MXNet, DALI, NVIDIA's tuned "
    "MLPerf stack); used only as the ceiling of the sensitivity table")
TIMM_RESNET50_TRAIN_SAMPLES_PER_SECOND = Anchor(
    1218.01, "images/s at 224", MEASURED_ON_GPU,
    "huggingface/pytorch-image-models, results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv "
    "(RTX 3090, AMP, channels_last, PyTorch 1.12), row resnet50")
TIMM_EFFICIENTNET_B7_TRAIN_SAMPLES_PER_SECOND = Anchor(
    37.97, "images/s at 600", MEASURED_ON_GPU, "same file, row efficientnet_b7 (batch 8)")
TIMM_EFFICIENTNET_B7_TRAIN_IMAGE_SIZE = Anchor(
    600, "px", MEASURED_ON_GPU, "same file, train_img_size of efficientnet_b7")
RESNET50_GFLOPS_224 = Anchor(
    4.09, "GFLOPS at 224", PUBLISHED, "torchvision's model table (docs.pytorch.org/vision/stable/models), resnet50")
EFFICIENTNET_B7_GFLOPS_600 = Anchor(
    37.75, "GFLOPS at 600", PUBLISHED, "the same table, efficientnet_b7")
PIXEL_COST_EXPONENT = Anchor(
    1.0, "", ASSUMED,
    "a network's cost per image grows as (pixels) to this power when the image shrinks (convolution "
    "FLOPs are linear in pixels); timm measured B7 at 600 px with batch 8, so scaling it to 224 px "
    "likely overstates B7's cost there (the sensitivity table gives B7 ResNet-50's FLOP efficiency)")
METHOD_STEP_EFFICIENCY = Anchor(
    0.9, "of the bare loop", ASSUMED,
    "the method's step (views built on the GPU included) against a bare fwd+bwd+optimizer loop of "
    "the same images: bench/gpu_check.py's target; 0.94 measured here on the CPU with a tiny network "
    "(BENCHMARKS.md, 'The GPU check, run on the CPU')")
FORWARD_SHARE = Anchor(
    1 / 3, "of fwd+bwd", ASSUMED, "a forward pass costs a third of forward + backward (backward about 2x)")

# ------------------------------------------------------------------------- gradient buckets

RESNET50_GRADIENT_BUCKETS = Anchor(
    (31567904, 26255360, 26550272, 9724160), "bytes", MEASURED_HERE,
    "OverlappedGradientAverage's 25 MiB buckets (pipeline/training/gradients.py, launch order) over "
    "timm resnet50 with the 8-class head: 23,524,424 fp32 parameters")
EFFICIENTNET_B7_GRADIENT_BUCKETS = Anchor(
    (31452832, 34632320, 26302464, 27381888, 27381888, 27381888, 27381888, 26252288, 26222992, 839344),
    "bytes", MEASURED_HERE, "the same for timm efficientnet_b7: 63,807,448 fp32 parameters")

# ----------------------------------------------------------------------------- interconnect

GPUS_PER_NODE = Anchor(8, "GPUs", PUBLISHED, "p5.48xlarge, a3-highgpu-8g and a3-megagpu-8g each carry 8 H100")
NVLINK_GIGABYTES_PER_SECOND = Anchor(
    450, "GB/s per GPU each way", PUBLISHED, "NVIDIA H100 SXM datasheet: NVLink 900 GB/s (both directions)")
NETWORK_EFFICIENCY = Anchor(
    0.8, "of line rate", ASSUMED, "the share of NVLink or NIC line rate NCCL reaches on 10-30 MB all-reduces")
NVLINK_HOP_LATENCY_MICROSECONDS = Anchor(2, "µs", ASSUMED, "per ring step inside a node")
NETWORK_HOP_LATENCY_MICROSECONDS = Anchor(10, "µs", ASSUMED, "per ring step between nodes (EFA, GPUDirect-TCPX(O))")
TCP_HOP_LATENCY_MICROSECONDS = Anchor(30, "µs", ASSUMED, "per ring step between nodes over kernel TCP")
P5_GPU_NETWORK_GBPS = Anchor(
    3200, "Gbit/s per node", PUBLISHED,
    "AWS p5.48xlarge: 3,200 Gbps of EFA networking (aws.amazon.com/ec2/instance-types/p5; the EC2 "
    "Capacity Blocks pricing page lists the same); needs EFA interfaces and NCCL's EFA plugin")
A3_MEGA_GPU_NETWORK_GBPS = Anchor(
    1600, "Gbit/s per node", PUBLISHED,
    "GCP a3-megagpu-8g: 1,800 Gbps in all with GPUDirect-TCPXO (docs.cloud.google.com/compute/docs/gpus/"
    "gpu-network-bandwidth), of which 8 x 200 Gbps on the GPU NICs (the split is our reading)")
A3_HIGH_GPU_NETWORK_GBPS = Anchor(
    800, "Gbit/s per node", PUBLISHED,
    "GCP a3-highgpu-8g: 1,000 Gbps in all with GPUDirect-TCPX (same page), of which 4 x 200 Gbps on the "
    "GPU NICs (the split is our reading)")
TCP_FALLBACK_GIGABYTES_PER_SECOND = Anchor(
    4, "GB/s per node", PUBLISHED,
    "NVIDIA AI Cluster Runtime docs, 'GKE TCPXO networking prerequisites': without GPUDirect-TCPXO NCCL "
    "falls back to TCP at about 4 GB/s (against about 340 GB/s with it); what an A3 cluster gets when "
    "its launcher does not set up the GPU NICs' VPCs and NCCL plugin")

# --------------------------------------------------------------------------------- CPU work

RAY_DATA_STREAM_MS_PER_IMAGE = Anchor(
    2000 / 6178, "ms per image per vCPU", MEASURED_HERE,
    "BENCHMARKS.md 'Streaming against fair baselines': the training stream (Ray Data decode of 112 px "
    "JPEGs, crop/flip, shuffle, split) at 6,178 images/s steady on 2 vCPUs")
DECODE_112_MS = Anchor(
    1000 / 6400, "ms per image", MEASURED_HERE,
    "torchvision.io.decode_jpeg of real 112 px face photos on one core of this VM (2026-11-23)")
RESIZE_TO_224_MS = Anchor(
    0.09, "ms per image", MEASURED_HERE,
    "112 -> 224 uint8 resize on one core of this VM (cv2, 2026-11-23); torch's antialiased uint8 "
    "kernel, which the pipeline uses, assumed as fast")
LARGER_COPY_224_MS = Anchor(
    0.05, "ms per image", ASSUMED, "the copies of a 224 px image (4x the 112 px bytes) through the stream")
CPU_AUGMENTATION_MS_PER_IMAGE = Anchor(
    10, "ms per image", MEASURED_HERE,
    "the stock recipe on the CPU (PIL decode, weak view with hue jitter, timm RandAugment, float32) on "
    "one core of this VM (2026-11-23): for contrast only, the pipeline builds these views on the GPU")
TRAINING_PROCESS_VCPUS_PER_GPU = Anchor(
    1, "vCPU", ASSUMED, "the training loop's own thread (kernel launches, the step's Python) per GPU")
RAY_SYSTEM_VCPUS_PER_NODE = Anchor(4, "vCPU", ASSUMED, "raylet, object store, Ray Data's coordinator")

# ---------------------------------------------------------------------------- storage, data

SHARD_BYTES_PER_ROW = Anchor(
    6610, "B", ASSUMED,
    "a real MS1MV2 record (112 x 112 JPEG) taken as 6.6 kB, BENCHMARKS.md's assumption (our plain "
    "renders are 4.3 kB, raw pixels 37.6 kB; the real figure is train.rec's size over the record count "
    "of train.idx, not available here); shards add 0.1 % (12.83 GB of shards for 12.82 GB of .rec, "
    "1,940,884 rows, measured here)")
NODE_STORAGE_GBPS = Anchor(
    25, "Gbit/s per node", ASSUMED, "S3 or GCS reads one node sustains with parallel GETs (conservative)")
STREAM_START_SECONDS = Anchor(
    30, "s", MEASURED_HERE,
    "BENCHMARKS.md: 14.5-28.9 s to the first batch of a pool pass on this VM (assumed no better on a GPU node)")
MS1MV2_ROWS = Anchor(
    1940884, "rows", PUBLISHED, "the papers' MS1MV2 subset (1.94M); ingested here at that size (BENCHMARKS.md)")
FER_POOL_ROWS = Anchor(
    1.45e6, "rows", ASSUMED,
    "the FER rows left for the pool: Aff-Wild2 expression training frames (about 2.6M frames over 546 "
    "videos, 248 of them training, split by video count: about 1.19M), AffectNet (about 288k) and ExpW "
    "(91,793), less the labeled draw; sizes from the datasets' papers and the ABAW reports")
LABELED_SET_ROWS = Anchor(
    120000, "rows", ASSUMED, "jobs.split --per-class 8000 over 15 class groups (docs/methods.md), no shortfall")
VALIDATION_FRAMES = Anchor(
    336000, "frames", ASSUMED, "Aff-Wild2 expression validation, 70 of the 546 videos' 2.6M frames by video count")
SMOOTHING_FRAMES_PER_SECOND = Anchor(
    15000 / 7.9e-3, "frames/s", MEASURED_HERE,
    "BENCHMARKS.md: smoothing 15,000 predictions took 7.9 ms (rank 0's validation report)")
CHECKPOINT_MEGABYTES_PER_SECOND = Anchor(
    200, "MB/s", ASSUMED, "rank 0 writing the epoch's checkpoint to S3/GCS while the others wait")

# ------------------------------------------------------------------------------------ nodes

P5_VCPUS = Anchor(192, "vCPU", PUBLISHED, "AWS p5.48xlarge (EC2 instance type page, Capacity Blocks pricing page)")
P5_MEMORY_GIB = Anchor(2048, "GiB", PUBLISHED, "AWS p5.48xlarge")
A3_VCPUS = Anchor(
    208, "vCPU", PUBLISHED, "GCP A3 High and Mega (cloud.google.com/compute/docs/accelerator-optimized-machines)")
A3_MEMORY_GIB = Anchor(1872e9 / 2**30, "GiB", PUBLISHED, "GCP A3 High and Mega: 1,872 GB")
OBJECT_STORE_FRACTION = Anchor(
    0.3, "of memory", PUBLISHED,
    "Ray 2.60 default (ray/_private/ray_constants.py DEFAULT_OBJECT_STORE_MEMORY_PROPORTION)")
OBJECT_STORE_CAP_GB = Anchor(
    200, "GB", PUBLISHED,
    "Ray 2.60 DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES; also capped at 95 % of /dev/shm, but not below "
    "10 GB (ray/_private/utils.py resolve_object_store_memory)")
SHM_FRACTION = Anchor(
    0.5, "of memory", ASSUMED, "Linux's default /dev/shm size (KubeRay sizes it to the container's memory limit)")

# ----------------------------------------------------------------------------------- prices

P5_USD_PER_HOUR = Anchor(
    55.04, "USD/h", ASSUMED,
    "p5.48xlarge on demand, us-east-1: 98.32 at launch (The Next Platform, 2023-07-27, from AWS's "
    "price page); AWS cut P5 on-demand prices by up to 45 % in June 2025; 55.04 is the figure "
    "reported after the cut, not checked against aws.amazon.com/ec2/pricing/on-demand in this session. "
    "A list price: it changes")
A3_USD_PER_HOUR = Anchor(
    55.04, "USD/h", ASSUMED,
    "placeholder equal to p5's: no a3-highgpu-8g / a3-megagpu-8g on-demand price was found in this "
    "session (cloud.google.com/compute/vm-instance-pricing, accelerator-optimized); replace before use")

ANCHORS: dict[str, Anchor] = {name: value for name, value in list(globals().items()) if isinstance(value, Anchor)}
"""Every anchor, found by type: adding a constant above is all it takes."""


class Inputs:
    """Anchor values by attribute, with overrides, remembering which were read (a table's basis)."""

    def __init__(self, overrides: Mapping[str, Any] | None = None) -> None:
        overrides = dict(overrides or {})
        unknown = sorted(set(overrides) - set(ANCHORS))
        if unknown:
            raise KeyError(f"unknown anchor(s): {', '.join(unknown)} (known: {', '.join(sorted(ANCHORS))})")
        self._overrides = overrides
        self._values = {name: anchor.value for name, anchor in ANCHORS.items()}
        self._values.update(overrides)
        self.read: set[str] = set()

    def moved(self, overrides: Mapping[str, Any]) -> Inputs:
        """These inputs with more anchors moved (a sensitivity case keeps the reader's --set)."""
        return Inputs({**self._overrides, **overrides})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            value = self._values[name]
        except KeyError:
            raise AttributeError(f"no anchor named {name}") from None
        self.read.add(name)
        return value


# ------------------------------------------------------------------------ workloads, nodes


@dataclass(frozen=True)
class Workload:
    name: str
    recipe: str
    overrides: tuple[str, ...]
    """`--set` overrides on the recipe that give this workload (tests load them through the config)."""
    backbone: str
    precision: str
    image_size: int
    labeled: int
    unlabeled: int
    trained: tuple[tuple[str, int], ...]
    """(network, images through its forward + backward) per step, in the order the backwards run."""
    forward_only: int
    """Images through a forward pass without gradient per step."""
    thresholds: bool
    """Whether the method scores the labeled set after each epoch (DTM)."""
    state_copies: int
    """Method state averaged over the workers after each epoch and checkpointed, in parameter sets
    (DTM: network, EMA, Adam's two moments; feedback: two networks and their two momenta)."""
    epochs: int
    steps_per_epoch: int
    buckets: str
    """The anchor holding one network's gradient buckets."""

    @property
    def distinct_images(self) -> int:
        return self.labeled + self.unlabeled

    @property
    def network_images(self) -> int:
        return sum(images for _, images in self.trained) + self.forward_only


WORKLOADS = (
    # DTM: one pass over [labeled weak, unlabeled weak, unlabeled strong]; EMA network, Adam.
    Workload("DTM, ResNet-50", "abaw5_dtm", ("model.backbone=resnet50",), "resnet50", "bf16", 224,
             32, 32, (("network", 96),), 0, True, 4, 30, 1000, "RESNET50_GRADIENT_BUCKETS"),
    Workload("DTM, EfficientNet-B7", "abaw5_dtm", (), "tf_efficientnet_b7", "bf16", 224,
             32, 32, (("network", 96),), 0, True, 4, 30, 1000, "EFFICIENTNET_B7_GRADIENT_BUCKETS"),
    # Feedback: student fwd+bwd over B + U, then a no-grad rerun of that batch, then the teacher's
    # backward over B + 2U (its forward ran first); two SGD optimizers, fp32 (TF32).
    Workload("feedback, ResNet-50", "abaw6_feedback", (), "resnet50", "fp32", 224,
             32, 32, (("student", 64), ("teacher", 96)), 64, False, 4, 100, 1000, "RESNET50_GRADIENT_BUCKETS"),
)


@dataclass(frozen=True)
class NodeType:
    name: str
    vcpus: str
    memory: str
    price: str
    hop_latency: str
    gpu_network: Callable[[Inputs], float]
    """Bytes/s one node's GPU network carries (line rate x efficiency), all its GPUs together."""


NODE_TYPES = (
    NodeType("p5.48xlarge, EFA", "P5_VCPUS", "P5_MEMORY_GIB", "P5_USD_PER_HOUR", "NETWORK_HOP_LATENCY_MICROSECONDS",
             lambda inputs: inputs.P5_GPU_NETWORK_GBPS * 1e9 / 8 * inputs.NETWORK_EFFICIENCY),
    NodeType("a3-megagpu-8g, TCPXO", "A3_VCPUS", "A3_MEMORY_GIB", "A3_USD_PER_HOUR", "NETWORK_HOP_LATENCY_MICROSECONDS",
             lambda inputs: inputs.A3_MEGA_GPU_NETWORK_GBPS * 1e9 / 8 * inputs.NETWORK_EFFICIENCY),
    NodeType("a3-highgpu-8g, TCPX", "A3_VCPUS", "A3_MEMORY_GIB", "A3_USD_PER_HOUR", "NETWORK_HOP_LATENCY_MICROSECONDS",
             lambda inputs: inputs.A3_HIGH_GPU_NETWORK_GBPS * 1e9 / 8 * inputs.NETWORK_EFFICIENCY),
    NodeType("a3-highgpu-8g, TCP only", "A3_VCPUS", "A3_MEMORY_GIB", "A3_USD_PER_HOUR", "TCP_HOP_LATENCY_MICROSECONDS",
             lambda inputs: inputs.TCP_FALLBACK_GIGABYTES_PER_SECOND * 1e9),
)
NODE_BY_NAME = {node.name: node for node in NODE_TYPES}
SIZES = (8, 32, 128)
PRIMARY_NODE = NODE_TYPES[0]

GPU_COMPUTE = "GPU compute"
CPU_DECODE = "CPU decode"
STORAGE_INGRESS = "storage ingress"
ALL_REDUCE = "all-reduce"
LIMITS = (GPU_COMPUTE, CPU_DECODE, STORAGE_INGRESS, ALL_REDUCE)


# ------------------------------------------------------------------------------ the formulas


def allreduce_seconds(size_bytes: float, gpus: int, node: NodeType, inputs: Inputs) -> float:
    """One all-reduce of `size_bytes` over `gpus` GPUs, 8 to a node, the way NCCL arranges it:
    a ring over NVLink inside each node (each GPU sends and receives 2(g-1)/g of the buffer), and
    between nodes a ring per GPU rail carrying that GPU's 1/g share: 2(n-1)/n x size/g over the
    GPU's share of the node's network. Plus a fixed cost per ring step. One node: the plain ring
    formula 2(N-1)/N x bytes / bandwidth."""
    if gpus <= 1:
        return 0.0
    per_node = min(gpus, int(inputs.GPUS_PER_NODE))
    nodes = math.ceil(gpus / per_node)
    nvlink = inputs.NVLINK_GIGABYTES_PER_SECOND * 1e9 * inputs.NETWORK_EFFICIENCY
    seconds = (2 * (per_node - 1) / per_node * size_bytes / nvlink
               + 2 * (per_node - 1) * inputs.NVLINK_HOP_LATENCY_MICROSECONDS * 1e-6)
    if nodes > 1:
        per_gpu_network = node.gpu_network(inputs) / per_node
        seconds += (2 * (nodes - 1) / nodes * (size_bytes / per_node) / per_gpu_network
                    + 2 * (nodes - 1) * getattr(inputs, node.hop_latency) * 1e-6)
    return seconds


def exposed_seconds(bucket_bytes: tuple[float, ...], bucket_seconds: list[float], backward_seconds: float) -> float:
    """The communication left after backward ends, with buckets launched as backward fills them.

    Gradient bytes are taken to appear at an even rate over backward (in ResNet-50 most bytes are in
    the last stage, whose backward comes first and is cheap, so the real buckets fill earlier: this
    errs towards more exposure). Buckets cross the wire one after another, in launch order."""
    total = sum(bucket_bytes)
    finish, produced = 0.0, 0.0
    for size, seconds in zip(bucket_bytes, bucket_seconds):
        produced += size
        ready = backward_seconds * produced / total
        finish = max(finish, ready) + seconds
    return max(0.0, finish - backward_seconds)


def bare_images_per_second(workload: Workload, inputs: Inputs) -> float:
    """A bare fwd+bwd+optimizer loop of this backbone and precision on one H100, images/s."""
    a100 = (inputs.RESNET50_A100_BF16_IMAGES_PER_SECOND if workload.precision == "bf16"
            else inputs.RESNET50_A100_TF32_IMAGES_PER_SECOND)
    rate = a100 * inputs.H100_OVER_A100
    # timm's weights for B7 are under tf_efficientnet_b7 (the recipe's name): the same network as
    # the efficientnet_b7 row the speed anchor comes from.
    if workload.backbone in ("efficientnet_b7", "tf_efficientnet_b7"):
        rate *= efficientnet_b7_relative_rate(workload.image_size, inputs)
    elif workload.backbone != "resnet50":
        raise ValueError(f"no speed anchor for backbone {workload.backbone}")
    return rate


def efficientnet_b7_relative_rate(image_size: int, inputs: Inputs) -> float:
    """EfficientNet-B7's images/s over ResNet-50's at `image_size`, from timm's measurements at
    their own sizes (B7 at 600 px, ResNet-50 at 224), B7 scaled to `image_size` by pixel count."""
    pixels = (inputs.TIMM_EFFICIENTNET_B7_TRAIN_IMAGE_SIZE / image_size) ** 2
    b7 = inputs.TIMM_EFFICIENTNET_B7_TRAIN_SAMPLES_PER_SECOND * pixels ** inputs.PIXEL_COST_EXPONENT
    return b7 / inputs.TIMM_RESNET50_TRAIN_SAMPLES_PER_SECOND


@dataclass
class GpuStep:
    """One worker's step on one H100."""
    bare_rate: float
    compute_seconds: float
    backward_seconds: dict[str, float]
    pool_cpu_seconds: float
    """vCPU-seconds the Ray Data stream spends on this step's unlabeled images (decode, crop, flip)."""
    labeled_thread_seconds: float
    """Seconds the training process's one input thread spends on the step's labeled images."""
    evaluation_seconds_per_image: float
    """One thread decoding an image for validation or the threshold pass."""


def gpu_step(workload: Workload, inputs: Inputs) -> GpuStep:
    bare = bare_images_per_second(workload, inputs)
    per_image = 1 / (bare * inputs.METHOD_STEP_EFFICIENCY)
    forward_share = inputs.FORWARD_SHARE
    compute = (sum(images for _, images in workload.trained) + workload.forward_only * forward_share) * per_image
    backward = {network: images * (1 - forward_share) * per_image for network, images in workload.trained}
    if workload.image_size != 224:
        raise ValueError("the CPU anchors are for 112 px JPEGs resized to 224")
    resize_and_copy = (inputs.RESIZE_TO_224_MS + inputs.LARGER_COPY_224_MS) / 1000
    pool = workload.unlabeled * (inputs.RAY_DATA_STREAM_MS_PER_IMAGE / 1000 + resize_and_copy)
    single = inputs.DECODE_112_MS / 1000 + resize_and_copy
    return GpuStep(bare, compute, backward, pool, workload.labeled * single, single)


@dataclass
class Scenario:
    """A workload on `gpus` GPUs of one node type."""
    workload: Workload
    node: NodeType
    gpus: int
    step: GpuStep
    ceilings: dict[str, float]
    """Steps/s per worker each resource alone allows."""
    wire_seconds: float
    exposed_seconds: float
    serial_seconds: float
    """The exposed communication with one all-reduce after backward (no overlap)."""
    step_seconds: float
    decode_vcpus_needed: float
    decode_vcpus_available: float
    storage_bytes_per_second: float
    """Per node."""
    object_store_bytes: float
    decoded_bytes_per_second: float
    """Decoded 224 px pixels the stream hands one node's workers per second."""
    nodes: int
    epoch: dict[str, float] = field(default_factory=dict)
    pool_pass_seconds: float = 0.0

    @property
    def bottleneck(self) -> str:
        """The resource whose ceiling is lowest: the one that bites first."""
        return min(LIMITS, key=lambda limit: self.ceilings[limit])


def object_store_bytes(node: NodeType, inputs: Inputs) -> float:
    """Ray's default object store on a node of this type (resolve_object_store_memory)."""
    memory = getattr(inputs, node.memory) * 2**30
    shm_cap = max(10e9, 0.95 * inputs.SHM_FRACTION * memory)
    return min(inputs.OBJECT_STORE_FRACTION * memory, inputs.OBJECT_STORE_CAP_GB * 1e9, shm_cap)


def scenario(workload: Workload, node: NodeType, gpus: int, inputs: Inputs) -> Scenario:
    step = gpu_step(workload, inputs)
    per_node = int(inputs.GPUS_PER_NODE)
    buckets = getattr(inputs, workload.buckets)
    wire, exposed, serial = 0.0, 0.0, 0.0
    for network, _ in workload.trained:
        seconds = [allreduce_seconds(size, gpus, node, inputs) for size in buckets]
        wire += sum(seconds)
        exposed += exposed_seconds(buckets, seconds, step.backward_seconds[network])
        serial += allreduce_seconds(sum(buckets), gpus, node, inputs)
    available = ((getattr(inputs, node.vcpus) - inputs.RAY_SYSTEM_VCPUS_PER_NODE) / per_node
                 - inputs.TRAINING_PROCESS_VCPUS_PER_GPU)
    cpu_seconds = step.pool_cpu_seconds + step.labeled_thread_seconds
    step_bytes_per_node = min(gpus, per_node) * workload.unlabeled * inputs.SHARD_BYTES_PER_ROW
    ceilings = {
        GPU_COMPUTE: 1 / step.compute_seconds,
        CPU_DECODE: min(available / cpu_seconds, 1 / step.labeled_thread_seconds),
        STORAGE_INGRESS: inputs.NODE_STORAGE_GBPS * 1e9 / 8 / step_bytes_per_node,
        ALL_REDUCE: 1 / wire if wire > 0 else math.inf,
    }
    step_seconds = max(step.compute_seconds + exposed, 1 / ceilings[CPU_DECODE], 1 / ceilings[STORAGE_INGRESS])
    result = Scenario(
        workload, node, gpus, step, ceilings, wire, exposed, serial, step_seconds,
        decode_vcpus_needed=cpu_seconds / step_seconds, decode_vcpus_available=available,
        storage_bytes_per_second=step_bytes_per_node / step_seconds,
        object_store_bytes=object_store_bytes(node, inputs),
        decoded_bytes_per_second=(min(gpus, per_node) * workload.unlabeled * workload.image_size ** 2 * 3
                                  / step_seconds),
        nodes=math.ceil(gpus / per_node))
    result.epoch = epoch_seconds(result, inputs)
    result.pool_pass_seconds = ((inputs.MS1MV2_ROWS + inputs.FER_POOL_ROWS)
                                / (gpus * workload.unlabeled / step_seconds) + inputs.STREAM_START_SECONDS)
    return result


def epoch_seconds(result: Scenario, inputs: Inputs) -> dict[str, float]:
    """The parts of one epoch: its steps (both epoch rules) and what runs after them."""
    workload, step, gpus = result.workload, result.step, result.gpus
    # Validation and the threshold pass: each worker its 1/N of the rows, decoded on one thread
    # while the network runs the previous batch (evaluate.prepared_batches).
    forward_rate = step.bare_rate / inputs.FORWARD_SHARE
    rate = min(1 / step.evaluation_seconds_per_image, forward_rate)
    parameter_bytes = sum(getattr(inputs, workload.buckets))
    state_bytes = workload.state_copies * parameter_bytes
    probabilities = inputs.VALIDATION_FRAMES * 8 * 4
    parts = {
        "steps": workload.steps_per_epoch * result.step_seconds,
        "steps_images_rule": math.ceil(workload.steps_per_epoch / gpus) * result.step_seconds,
        "thresholds": math.ceil(inputs.LABELED_SET_ROWS / gpus) / rate if workload.thresholds else 0.0,
        "validation": (math.ceil(inputs.VALIDATION_FRAMES / gpus) / rate
                       + allreduce_seconds(probabilities, gpus, result.node, inputs)
                       + inputs.VALIDATION_FRAMES / inputs.SMOOTHING_FRAMES_PER_SECOND),
        "sync": allreduce_seconds(state_bytes, gpus, result.node, inputs),
        "checkpoint": state_bytes / (inputs.CHECKPOINT_MEGABYTES_PER_SECOND * 1e6),
    }
    after = parts["thresholds"] + parts["validation"] + parts["sync"] + parts["checkpoint"]
    parts["after_steps"] = after
    parts["total"] = parts["steps"] + after
    parts["total_images_rule"] = parts["steps_images_rule"] + after
    return parts


def cost_usd(result: Scenario, seconds: float, inputs: Inputs) -> float:
    return result.nodes * seconds / 3600 * getattr(inputs, result.node.price)


# ------------------------------------------------------------------------------- formatting


def number(value: float, digits: int = 3) -> str:
    """`digits` significant figures, thousands separated (1,234 / 12.3 / 0.0123)."""
    if value == 0:
        return "0"
    if math.isinf(value):
        return "inf"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{int(value):,}"
    magnitude = math.floor(math.log10(abs(value)))
    decimals = max(0, digits - 1 - magnitude)
    return f"{round(value, decimals):,.{decimals}f}"


def duration(seconds: float) -> str:
    if seconds < 0.1:
        return f"{number(seconds * 1000, 2)} ms"
    if seconds < 120:
        return f"{number(seconds, 2)} s"
    if seconds < 7200:
        return f"{number(seconds / 60, 2)} min"
    return f"{number(seconds / 3600, 2)} h"


def milliseconds(seconds: float) -> str:
    return number(seconds * 1000, 2)


def usd(value: float) -> str:
    return f"${number(value, 2)}"


def megabytes(value: float) -> str:
    return f"{number(value / 1e6, 3)} MB"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def basis(inputs: Inputs) -> str:
    """The anchors a table read, grouped by how they are known."""
    groups = []
    for kind in KINDS:
        names = sorted(name for name in inputs.read if ANCHORS[name].kind == kind)
        if names:
            groups.append(f"{kind}: " + ", ".join(f"`{name}`" for name in names))
    return "Anchors read, by kind. " + "; ".join(groups) + "."


def gpus_label(gpus: int, inputs: Inputs) -> str:
    nodes = math.ceil(gpus / inputs.GPUS_PER_NODE)
    return f"{gpus} ({nodes} node{'s' if nodes > 1 else ''})"


# ----------------------------------------------------------------------------------- tables


def table_summary(inputs: Inputs) -> str:
    rows = []
    for workload in WORKLOADS:
        for gpus in SIZES:
            result = scenario(workload, PRIMARY_NODE, gpus, inputs)
            rate = 1 / result.step_seconds
            rows.append([
                workload.name, gpus_label(gpus, inputs), f"{gpus * workload.labeled:,} + {gpus * workload.unlabeled:,}",
                number(workload.network_images * rate), number(workload.distinct_images * rate),
                f"{number(result.decode_vcpus_needed, 2)} of {number(result.decode_vcpus_available, 3)}",
                f"{number(result.storage_bytes_per_second / 1e6, 2)} MB/s",
                f"{milliseconds(result.wire_seconds)} / {milliseconds(result.exposed_seconds)}",
                milliseconds(result.step_seconds),
                duration(result.epoch["total"]), usd(cost_usd(result, result.epoch["total"], inputs)),
                duration(result.pool_pass_seconds), result.bottleneck,
            ])
    header = ["workload", "GPUs", "global batch (labeled + unlabeled)", "network images/s per GPU",
              "distinct images/s per GPU", "decode vCPUs per GPU: needed of available", "storage read per node",
              "all-reduce ms per step: wire / exposed", "step ms", "epoch (1,000 steps + passes)",
              "cost per epoch", "one pass over the pool", "limit that bites first"]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_gpu_step(inputs: Inputs) -> str:
    rows = []
    for workload in WORKLOADS:
        step = gpu_step(workload, inputs)
        rate = 1 / step.compute_seconds
        cpu_per_step = step.pool_cpu_seconds + step.labeled_thread_seconds
        stock = workload.distinct_images * inputs.CPU_AUGMENTATION_MS_PER_IMAGE / 1000
        rows.append([
            workload.name, workload.precision, f"{workload.network_images}",
            number(sum(images for _, images in workload.trained) + workload.forward_only * inputs.FORWARD_SHARE),
            number(step.bare_rate), number(step.bare_rate * inputs.METHOD_STEP_EFFICIENCY),
            milliseconds(step.compute_seconds), number(workload.distinct_images * rate),
            milliseconds(cpu_per_step), milliseconds(step.labeled_thread_seconds),
            number(cpu_per_step * rate, 2), number(stock * rate, 2),
        ])
    header = ["workload", "precision", "network images per step", "fwd+bwd image equivalents",
              "bare loop images/s", "method images/s", "compute ms per step", "distinct images/s",
              "CPU ms per step (decode, resize, crop/flip)", "of which the input thread's (labeled)",
              "decode vCPUs per GPU", "vCPUs per GPU with the views on the CPU (stock recipe)"]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_all_reduce(inputs: Inputs) -> str:
    rows = []
    for workload in WORKLOADS:
        size = sum(getattr(inputs, workload.buckets)) * len(workload.trained)
        for gpus in SIZES:
            nodes = NODE_TYPES[:1] if gpus <= inputs.GPUS_PER_NODE else NODE_TYPES
            for node in nodes:
                result = scenario(workload, node, gpus, inputs)
                hidden = 1 - result.exposed_seconds / result.wire_seconds
                rows.append([
                    workload.name, megabytes(size), gpus_label(gpus, inputs),
                    "NVLink only" if gpus <= inputs.GPUS_PER_NODE else node.name,
                    milliseconds(result.wire_seconds), milliseconds(result.serial_seconds),
                    milliseconds(result.exposed_seconds), f"{number(100 * hidden, 2)} %",
                    milliseconds(result.step.compute_seconds), milliseconds(result.step_seconds),
                    result.bottleneck,
                ])
    header = ["workload", "gradients per step", "GPUs", "interconnect between nodes", "wire ms (buckets)",
              "exposed ms, one all-reduce after backward", "exposed ms, buckets overlapped", "hidden by overlap",
              "compute ms", "step ms", "limit that bites first"]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_epoch(inputs: Inputs) -> str:
    rows = []
    for workload in WORKLOADS:
        for gpus in SIZES:
            result = scenario(workload, PRIMARY_NODE, gpus, inputs)
            epoch = result.epoch
            run_steps = workload.epochs * epoch["total"]
            run_images = workload.epochs * epoch["total_images_rule"]
            rows.append([
                workload.name, gpus_label(gpus, inputs), duration(epoch["steps"]),
                duration(epoch["thresholds"]) if workload.thresholds else "-",
                duration(epoch["validation"]), duration(epoch["sync"]), duration(epoch["checkpoint"]),
                duration(epoch["total"]), f"{number(100 * epoch['steps'] / epoch['total'], 2)} %",
                f"{duration(run_steps)}, {usd(cost_usd(result, run_steps, inputs))}",
                duration(epoch["total_images_rule"]),
                f"{duration(run_images)}, {usd(cost_usd(result, run_images, inputs))}",
            ])
    header = ["workload", "GPUs", "1,000 steps", "threshold pass", "validation", "state sync", "checkpoint",
              "epoch", "steps' share", "run (recipe's epochs), steps rule", "epoch, images rule",
              "run, images rule"]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_one_gpu(inputs: Inputs) -> str:
    rows = []
    for workload in WORKLOADS:
        result = scenario(workload, PRIMARY_NODE, 1, inputs)
        run = workload.epochs * result.epoch["total"]
        per_gpu_hour = getattr(inputs, PRIMARY_NODE.price) / inputs.GPUS_PER_NODE
        rows.append([workload.name, f"{workload.epochs} x {workload.steps_per_epoch:,}",
                     milliseconds(result.step_seconds), duration(result.epoch["total"]), duration(run),
                     usd(run / 3600 * per_gpu_hour), result.bottleneck])
    header = ["workload", "epochs x steps", "step ms", "epoch", "run", "cost (1/8 of a node's hour)",
              "limit that bites first"]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_nodes(inputs: Inputs) -> str:
    rows = []
    for node in NODE_TYPES:
        store = object_store_bytes(node, inputs)
        per_gpu = node.gpu_network(inputs) / inputs.GPUS_PER_NODE
        decode_rate = max(scenario(workload, node, 8, inputs).decoded_bytes_per_second for workload in WORKLOADS)
        rows.append([node.name, number(getattr(inputs, node.vcpus)), f"{number(getattr(inputs, node.memory), 4)} GiB",
                     f"{number(store / 1e9, 3)} GB", f"{number(store / decode_rate, 2)} s",
                     f"{number(per_gpu / 1e9, 3)} GB/s", usd(getattr(inputs, node.price))])
    header = ["node", "vCPUs", "memory", "Ray object store (default)",
              "decoded output it holds at the fastest workload", "GPU network per GPU (effective)",
              "list price per hour"]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_sensitivity(inputs: Inputs) -> str:
    """DTM at 128 GPUs with one anchor moved at a time: what changes the limit that bites first."""
    ceiling = inputs.RESNET50_H100_MLPERF_IMAGES_PER_SECOND / inputs.RESNET50_A100_BF16_IMAGES_PER_SECOND
    # B7 given ResNet-50's FLOP efficiency: its rate is the FLOP ratio at 224 px, expressed through
    # the pixel exponent that makes the timm-derived rate equal that ratio.
    pixels = (inputs.TIMM_EFFICIENTNET_B7_TRAIN_IMAGE_SIZE / 224) ** 2
    flop_ratio = inputs.RESNET50_GFLOPS_224 / (inputs.EFFICIENTNET_B7_GFLOPS_600 / pixels)
    cases = [
        ("central", {}),
        ("H100 no faster than A100 (x1.0)", {"H100_OVER_A100": 1.0}),
        (f"H100 as fast as MLPerf's tuned stack (x{number(ceiling, 3)})", {"H100_OVER_A100": ceiling}),
        (f"B7 at ResNet-50's FLOP efficiency ({number(flop_ratio, 2)} of its rate, not "
         f"{number(efficientnet_b7_relative_rate(224, inputs), 2)})",
         {"PIXEL_COST_EXPONENT": math.log(flop_ratio * inputs.TIMM_RESNET50_TRAIN_SAMPLES_PER_SECOND
                                          / inputs.TIMM_EFFICIENTNET_B7_TRAIN_SAMPLES_PER_SECOND) / math.log(pixels)}),
        ("NCCL at 0.4 of line rate, not 0.8", {"NETWORK_EFFICIENCY": 0.4}),
        ("CPU work per image 5x the measured", {name: 5 * getattr(inputs, name) for name in (
            "RAY_DATA_STREAM_MS_PER_IMAGE", "DECODE_112_MS", "RESIZE_TO_224_MS", "LARGER_COPY_224_MS")}),
        ("records 3x larger (19.8 kB)", {"SHARD_BYTES_PER_ROW": 3 * inputs.SHARD_BYTES_PER_ROW}),
        ("records 3x larger, storage at 1 Gbit/s per node",
         {"SHARD_BYTES_PER_ROW": 3 * inputs.SHARD_BYTES_PER_ROW, "NODE_STORAGE_GBPS": 1.0}),
    ]
    columns = [(workload, node) for workload in WORKLOADS[:2]
               for node in (PRIMARY_NODE, NODE_BY_NAME["a3-highgpu-8g, TCP only"])]
    rows = []
    for label, overrides in cases:
        case_inputs = inputs.moved(overrides)
        row = [label]
        for workload, node in columns:
            result = scenario(workload, node, 128, case_inputs)
            row.append(f"{number(workload.network_images / result.step_seconds)}, "
                       f"{duration(result.epoch['total'])}, {result.bottleneck}")
        rows.append(row)
        inputs.read |= case_inputs.read
    header = ["case (DTM, 128 GPUs; network images/s per GPU, epoch, limit that bites first)"]
    header += [f"{workload.name.split(', ')[1]} on {node.name}" for workload, node in columns]
    return markdown(header, rows) + "\n\n" + basis(inputs)


def table_anchors(inputs: Inputs) -> str:
    rows = []
    for name, anchor in ANCHORS.items():
        value = getattr(inputs, name)
        if isinstance(value, tuple):
            shown = f"{len(value)} buckets, {number(sum(value) / 1e6, 4)} MB"
        else:
            shown = number(value, 4)
        rows.append([f"`{name}`", shown, anchor.unit, anchor.kind, anchor.source])
    return markdown(["anchor", "value", "unit", "kind", "source"], rows)


TABLES: dict[str, Callable[[Inputs], str]] = {
    "summary": table_summary,
    "gpu_step": table_gpu_step,
    "all_reduce": table_all_reduce,
    "epoch": table_epoch,
    "one_gpu": table_one_gpu,
    "nodes": table_nodes,
    "sensitivity": table_sensitivity,
    "anchors": table_anchors,
}


def render_tables(overrides: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Every table, each computed with fresh inputs so its basis lists only what it read."""
    Inputs(overrides)  # unknown names fail before any table is computed
    return {name: function(Inputs(overrides)) for name, function in TABLES.items()}


BLOCK = re.compile(r"<!-- scale_out: (\w+) -->\n((?:(?!<!-- /?scale_out).)*?)\n?<!-- /scale_out -->", re.DOTALL)
"""A table's place in the doc: between its opening marker and the next closing one (never across
another block's marker), so a block left empty is still found."""


def doc_tables(text: str) -> dict[str, str]:
    return {match.group(1): match.group(2) for match in BLOCK.finditer(text)}


def drift(text: str, tables: Mapping[str, str]) -> list[str]:
    """Names of the tables the doc lacks, holds unknown, or holds with other contents."""
    in_doc = doc_tables(text)
    return sorted(name for name in set(in_doc) | set(tables) if in_doc.get(name) != tables.get(name))


def rewrite(text: str, tables: Mapping[str, str]) -> str:
    missing = sorted(set(tables) - set(doc_tables(text)))
    if missing:
        raise KeyError(f"the doc has no block for table(s): {', '.join(missing)}")

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in tables:
            raise KeyError(f"the doc has a block for an unknown table: {name}")
        return f"<!-- scale_out: {name} -->\n{tables[name]}\n<!-- /scale_out -->"

    return BLOCK.sub(replace, text)


def parse_overrides(items: list[str]) -> dict[str, float]:
    overrides = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"--set {item!r}: expected NAME=VALUE")
        overrides[name.strip()] = float(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/scale_out.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override an anchor (repeatable)")
    parser.add_argument("--table", choices=sorted(TABLES), help="print this table only")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--check", metavar="DOC", help="exit 1 when DOC's tables differ from these")
    action.add_argument("--write", metavar="DOC", help="rewrite DOC's tables with these")
    arguments = parser.parse_args(argv)
    try:
        tables = render_tables(parse_overrides(arguments.set))
    except (KeyError, ValueError) as error:
        print(f"error: {error.args[0] if error.args else error}", file=sys.stderr)
        return 2
    if arguments.check or arguments.write:
        path = arguments.check or arguments.write
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if arguments.check:
            differing = drift(text, tables)
            if differing:
                print(f"{path}: tables differ from bench/scale_out.py: {', '.join(differing)}", file=sys.stderr)
                return 1
            print(f"{path}: {len(tables)} tables match")
            return 0
        try:
            text = rewrite(text, tables)
        except KeyError as error:
            print(f"error: {error.args[0]}", file=sys.stderr)
            return 2
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return 0
    for name, table in tables.items():
        if arguments.table in (None, name):
            print(f"## {name}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
