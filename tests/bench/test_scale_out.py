"""bench/scale_out.py: its formulas against cases worked by hand, its limits against each other, its
workloads against the recipes, and docs/scale-out.md against what it prints (so they never drift)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY / "bench" / "scale_out.py"
DOC = REPOSITORY / "docs" / "scale-out.md"


def _load():
    spec = importlib.util.spec_from_file_location("scale_out", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


scale_out = _load()
P5 = scale_out.NODE_BY_NAME["p5.48xlarge, EFA"]
TCP_ONLY = scale_out.NODE_BY_NAME["a3-highgpu-8g, TCP only"]
NO_LATENCY = {"NVLINK_HOP_LATENCY_MICROSECONDS": 0, "NETWORK_HOP_LATENCY_MICROSECONDS": 0,
              "TCP_HOP_LATENCY_MICROSECONDS": 0, "NETWORK_EFFICIENCY": 1.0}


def every_scenario(inputs=None):
    inputs = inputs or scale_out.Inputs()
    return [scale_out.scenario(workload, node, gpus, inputs)
            for workload in scale_out.WORKLOADS for node in scale_out.NODE_TYPES for gpus in scale_out.SIZES]


# ------------------------------------------------------------------------------ all-reduce


def test_one_node_all_reduce_is_the_ring_formula():
    inputs = scale_out.Inputs(NO_LATENCY)
    # 2 (N-1)/N x bytes / bandwidth: 2 x 7/8 x 100 MB / 450 GB/s = 0.38889 ms.
    assert scale_out.allreduce_seconds(100e6, 8, P5, inputs) == pytest.approx(2 * 7 / 8 * 100e6 / 450e9, rel=1e-12)
    assert scale_out.allreduce_seconds(100e6, 8, P5, inputs) == pytest.approx(0.38889e-3, rel=1e-4)
    # 2 GPUs of one node: 2 x 1/2 x 100 MB / 450 GB/s.
    assert scale_out.allreduce_seconds(100e6, 2, P5, inputs) == pytest.approx(100e6 / 450e9, rel=1e-12)
    assert scale_out.allreduce_seconds(100e6, 1, P5, inputs) == 0.0


def test_across_nodes_each_gpu_sends_its_eighth_over_its_share_of_the_network():
    inputs = scale_out.Inputs(NO_LATENCY)
    # 4 p5 nodes: NVLink ring 2 x 7/8 x 100 MB / 450 GB/s = 0.38889 ms, then each GPU's 12.5 MB over
    # its 3,200 Gbit/s / 8 = 50 GB/s: 2 x 3/4 x 12.5 MB / 50 GB/s = 0.375 ms.
    assert scale_out.allreduce_seconds(100e6, 32, P5, inputs) == pytest.approx(0.38889e-3 + 0.375e-3, rel=1e-4)
    # Over the TCP fallback (4 GB/s a node, 0.5 GB/s a GPU): 2 x 3/4 x 12.5 MB / 0.5 GB/s = 37.5 ms.
    assert scale_out.allreduce_seconds(100e6, 32, TCP_ONLY, inputs) == pytest.approx(0.38889e-3 + 37.5e-3, rel=1e-4)


def test_the_fixed_cost_is_one_latency_per_ring_step():
    inputs = scale_out.Inputs({"NETWORK_EFFICIENCY": 1.0})
    # No bytes: 2 x 7 NVLink steps of 2 µs and 2 x 3 network steps of 10 µs.
    assert scale_out.allreduce_seconds(0.0, 32, P5, inputs) == pytest.approx(14 * 2e-6 + 6 * 10e-6, rel=1e-12)


def test_wire_time_grows_with_the_number_of_nodes_but_stays_below_twice_the_share():
    inputs = scale_out.Inputs(NO_LATENCY)
    times = [scale_out.allreduce_seconds(100e6, gpus, P5, inputs) for gpus in (8, 16, 32, 128, 1024)]
    assert times == sorted(times) and len(set(times)) == len(times)
    bound = 2 * 7 / 8 * 100e6 / 450e9 + 2 * (100e6 / 8) / 50e9
    assert times[-1] < bound


# --------------------------------------------------------------------------------- overlap


def test_buckets_faster_than_backward_leave_only_the_last_one_exposed():
    # 4 equal buckets of 1 ms each over a 40 ms backward: each leaves as soon as it fills.
    assert scale_out.exposed_seconds((1, 1, 1, 1), [1e-3] * 4, 40e-3) == pytest.approx(1e-3)


def test_buckets_slower_than_backward_queue_up():
    # 4 equal buckets of 20 ms over a 40 ms backward: the first leaves at 10 ms, the wire is busy
    # from then on: 10 + 4 x 20 - 40 = 50 ms exposed (closed form B/k + k c - B).
    assert scale_out.exposed_seconds((1, 1, 1, 1), [20e-3] * 4, 40e-3) == pytest.approx(50e-3)


def test_unequal_buckets_by_hand():
    # Bytes 3 and 1 over a 4 ms backward: ready at 3 and 4 ms; wire 3 and 1 ms: the first ends at
    # 6 ms, the second at 7 ms: 3 ms after backward.
    assert scale_out.exposed_seconds((3, 1), [3e-3, 1e-3], 4e-3) == pytest.approx(3e-3)


def test_without_backward_to_hide_behind_everything_is_exposed():
    assert scale_out.exposed_seconds((1, 2, 3), [1e-3, 2e-3, 3e-3], 0.0) == pytest.approx(6e-3)
    assert scale_out.exposed_seconds((5,), [7e-3], 100e-3) == pytest.approx(7e-3)


def test_overlap_never_exposes_more_than_one_all_reduce_after_backward():
    for result in every_scenario():
        assert result.exposed_seconds <= result.serial_seconds * (1 + 1e-9), (result.workload.name, result.gpus)


# ---------------------------------------------------------------------------------- limits


def test_the_limit_that_bites_first_is_the_lowest_ceiling_and_no_step_beats_any_ceiling():
    for result in every_scenario():
        lowest = min(result.ceilings.values())
        assert result.ceilings[result.bottleneck] == lowest
        for limit, ceiling in result.ceilings.items():
            assert 1 / result.step_seconds <= ceiling * (1 + 1e-9), (result.workload.name, result.gpus, limit)


@pytest.mark.parametrize("overrides, node, gpus, limit", [
    ({}, P5, 128, scale_out.GPU_COMPUTE),
    ({"DECODE_112_MS": 5.0}, P5, 8, scale_out.CPU_DECODE),
    ({"NODE_STORAGE_GBPS": 0.1}, P5, 8, scale_out.STORAGE_INGRESS),
    ({}, TCP_ONLY, 32, scale_out.ALL_REDUCE),
])
def test_each_limit_bites_when_its_resource_is_made_scarce(overrides, node, gpus, limit):
    result = scale_out.scenario(scale_out.WORKLOADS[0], node, gpus, scale_out.Inputs(overrides))
    assert result.bottleneck == limit
    if limit in (scale_out.CPU_DECODE, scale_out.STORAGE_INGRESS):
        # The input side sets the pace: the step lasts exactly as long as that resource needs.
        assert result.step_seconds == pytest.approx(1 / result.ceilings[limit])
    if limit == scale_out.ALL_REDUCE:
        # The wire outlasts backward: the step waits for it, well past its compute.
        assert result.exposed_seconds > 0.5 * result.step.compute_seconds
        assert result.step_seconds == pytest.approx(result.step.compute_seconds + result.exposed_seconds)


def test_the_single_input_thread_caps_a_worker_however_many_vcpus_the_node_has():
    inputs = scale_out.Inputs({"DECODE_112_MS": 2.0, "P5_VCPUS": 10_000})
    result = scale_out.scenario(scale_out.WORKLOADS[0], P5, 8, inputs)
    assert result.bottleneck == scale_out.CPU_DECODE
    assert result.step_seconds == pytest.approx(result.step.labeled_thread_seconds)


# ----------------------------------------------------------------------------- monotonicity


def test_more_gpus_never_speed_up_a_gpu_and_the_images_rule_shortens_the_epoch():
    inputs = scale_out.Inputs()
    for workload in scale_out.WORKLOADS:
        for node in scale_out.NODE_TYPES:
            results = [scale_out.scenario(workload, node, gpus, inputs) for gpus in scale_out.SIZES]
            steps = [result.step_seconds for result in results]
            assert steps == sorted(steps)
            images_rule = [result.epoch["total_images_rule"] for result in results]
            assert images_rule == sorted(images_rule, reverse=True) and len(set(images_rule)) == 3
            costs = [scale_out.cost_usd(result, result.epoch["total"], inputs) for result in results]
            assert costs == sorted(costs) and len(set(costs)) == 3
            passes = [result.pool_pass_seconds for result in results]
            assert passes == sorted(passes, reverse=True)


def test_a_faster_network_exposes_less():
    inputs = scale_out.Inputs()
    for workload in scale_out.WORKLOADS:
        exposed = [scale_out.scenario(workload, node, 128, inputs).exposed_seconds for node in scale_out.NODE_TYPES]
        assert exposed == sorted(exposed) and len(set(exposed)) == len(exposed), workload.name


def test_a_faster_gpu_needs_more_decode_per_gpu():
    slow = scale_out.scenario(scale_out.WORKLOADS[0], P5, 8, scale_out.Inputs({"H100_OVER_A100": 1.0}))
    fast = scale_out.scenario(scale_out.WORKLOADS[0], P5, 8, scale_out.Inputs({"H100_OVER_A100": 2.0}))
    assert fast.decode_vcpus_needed == pytest.approx(2 * slow.decode_vcpus_needed, rel=0.05)
    assert fast.storage_bytes_per_second > slow.storage_bytes_per_second


def test_efficientnet_b7_costs_what_timm_measured_scaled_by_pixels():
    inputs = scale_out.Inputs()
    # 37.97 images/s at 600 px x (600/224)^2 = 272.4 at 224, against ResNet-50's 1,218.01.
    assert scale_out.efficientnet_b7_relative_rate(224, inputs) == pytest.approx(37.97 * (600 / 224) ** 2 / 1218.01)
    resnet, b7 = scale_out.WORKLOADS[0], scale_out.WORKLOADS[1]
    ratio = scale_out.gpu_step(b7, inputs).compute_seconds / scale_out.gpu_step(resnet, inputs).compute_seconds
    assert ratio == pytest.approx(1218.01 / (37.97 * (600 / 224) ** 2))


def test_the_object_store_follows_rays_default_rule():
    inputs = scale_out.Inputs()
    assert scale_out.object_store_bytes(P5, inputs) == 200e9  # 30 % of 2 TiB is capped at 200 GB
    small = scale_out.Inputs({"P5_MEMORY_GIB": 64})
    assert scale_out.object_store_bytes(P5, small) == pytest.approx(0.3 * 64 * 2**30)
    tight_shm = scale_out.Inputs({"P5_MEMORY_GIB": 64, "SHM_FRACTION": 0.05})
    assert scale_out.object_store_bytes(P5, tight_shm) == 10e9  # shm would allow 3.3 GB; never below 10 GB


# -------------------------------------------------------------------------------- anchors


def test_every_anchor_says_how_it_is_known_and_a_bad_one_is_refused():
    assert len(scale_out.ANCHORS) > 30
    for name, anchor in scale_out.ANCHORS.items():
        assert anchor.kind in scale_out.KINDS and anchor.source.strip(), name
    with pytest.raises(ValueError):
        scale_out.Anchor(1, "x", "guessed", "somewhere")
    with pytest.raises(ValueError):
        scale_out.Anchor(1, "x", scale_out.ASSUMED, " ")


def test_an_override_changes_the_tables_and_an_unknown_name_is_refused(capsys):
    with pytest.raises(KeyError, match="NO_SUCH_ANCHOR"):
        scale_out.Inputs({"NO_SUCH_ANCHOR": 1})
    assert scale_out.main(["--set", "NO_SUCH_ANCHOR=1"]) == 2
    assert "error: unknown anchor" in capsys.readouterr().err
    assert scale_out.main(["--set", "H100_OVER_A100", "--table", "summary"]) == 2
    capsys.readouterr()
    default = scale_out.render_tables()
    faster = scale_out.render_tables({"H100_OVER_A100": 2.0})
    assert faster["summary"] != default["summary"] and faster["anchors"] != default["anchors"]


@pytest.mark.parametrize("name, value", [("P5_USD_PER_HOUR", 100.0), ("H100_OVER_A100", 2.0),
                                         ("TCP_FALLBACK_GIGABYTES_PER_SECOND", 40.0), ("VALIDATION_FRAMES", 1e6)])
def test_a_table_changes_with_an_anchor_only_when_its_basis_names_it(name, value):
    # A basis that missed an anchor a table depends on would let a reader trust a figure's kind
    # wrongly; a table may read an anchor without showing a change (a limit that does not bite).
    default = scale_out.render_tables()
    moved = scale_out.render_tables({name: value})
    named = {table for table, text in default.items() if f"`{name}`" in text}
    changed = {table for table in default if moved[table] != default[table]}
    assert "anchors" in changed and len(changed) >= 2
    assert changed - {"anchors"} <= named


def _cells(table: str, first: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row starting {first!r}")


@pytest.mark.parametrize("overrides", [{}, {"H100_OVER_A100": 2.0}])
def test_the_sensitivity_table_starts_from_the_readers_anchors(overrides):
    tables = scale_out.render_tables(overrides)
    summary_row = next(line for line in tables["summary"].splitlines() if "| DTM, ResNet-50 | 128 " in line)
    summary_rate = summary_row.strip("|").split("|")[3].strip()
    central = _cells(tables["sensitivity"], "central")
    assert central[1].split(", ")[0] == summary_rate


def test_each_table_names_the_anchors_it_read_under_their_kind():
    tables = scale_out.render_tables()
    assert "`H100_OVER_A100`" in tables["summary"].split("assumed:")[1]
    assert "`RESNET50_A100_BF16_IMAGES_PER_SECOND`" in tables["summary"].split("measured on a GPU:")[1].split(";")[0]
    assert "`P5_USD_PER_HOUR`" in tables["nodes"] and "`P5_USD_PER_HOUR`" not in tables["gpu_step"]


# -------------------------------------------------------------------------- doc and recipes


def test_the_doc_holds_exactly_the_tables_the_script_prints():
    assert scale_out.drift(DOC.read_text(encoding="utf-8"), scale_out.render_tables()) == []


def test_a_doc_that_drifted_is_caught_and_rewritten(tmp_path, capsys):
    text = DOC.read_text(encoding="utf-8")
    tables = scale_out.render_tables()
    row = tables["summary"].splitlines()[2]
    changed = row.replace("GPU compute", "CPU decode")
    assert changed != row
    drifted = text.replace(row, changed, 1)
    assert scale_out.drift(drifted, tables) == ["summary"]
    without = scale_out.BLOCK.sub(lambda match: "" if match.group(1) == "epoch" else match.group(0), text)
    assert scale_out.drift(without, tables) == ["epoch"]
    copy = tmp_path / "scale-out.md"
    copy.write_text(drifted, encoding="utf-8")
    assert scale_out.main(["--check", str(copy)]) == 1
    assert scale_out.main(["--write", str(copy)]) == 0
    assert copy.read_text(encoding="utf-8") == text
    assert scale_out.main(["--check", str(copy)]) == 0
    capsys.readouterr()


def test_the_workloads_are_the_recipes():
    from pipeline.training.config import load_config

    for workload in scale_out.WORKLOADS:
        config = load_config(str(REPOSITORY / "jobs" / "recipes" / f"{workload.recipe}.yaml"), list(workload.overrides))
        assert config.model.backbone == workload.backbone
        assert config.data.image_size == workload.image_size
        assert config.data.labeled_batch == workload.labeled
        assert config.data.labeled_batch * config.data.unlabeled_ratio == workload.unlabeled
        assert config.run.steps_per_epoch == workload.steps_per_epoch and config.run.epochs == workload.epochs
        assert config.run.precision == workload.precision
        views = config.method_class().views
        through = (workload.labeled * (1 + views.labeled_strong)
                   + workload.unlabeled * (views.unlabeled + views.unlabeled_strong))
        if config.method == "dtm":
            assert workload.trained == (("network", through),) and workload.forward_only == 0
            assert workload.thresholds
        else:
            assert config.method == "feedback" and config.options().feedback_measurement == "joint"
            # The teacher over B + 2U, the student over B + U, and the student's no-grad rerun of B + U.
            assert dict(workload.trained) == {"teacher": through, "student": workload.labeled + workload.unlabeled}
            assert workload.forward_only == workload.labeled + workload.unlabeled
            assert not workload.thresholds


def test_the_script_is_pure_arithmetic():
    code = (f"import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('scale_out', {str(SCRIPT)!r})\n"
            f"module = importlib.util.module_from_spec(spec); sys.modules['scale_out'] = module\n"
            f"spec.loader.exec_module(module); module.render_tables()\n"
            f"heavy = [name for name in ('torch', 'ray', 'numpy', 'pipeline') if name in sys.modules]\n"
            f"assert not heavy, heavy\n")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.slow
def test_the_gradient_buckets_are_those_of_the_real_networks():
    torch = pytest.importorskip("torch")
    from pipeline.core.models import ModelConfig, create_model
    from pipeline.training.gradients import OverlappedGradientAverage

    for backbone, name in (("resnet50", "RESNET50_GRADIENT_BUCKETS"),
                           ("efficientnet_b7", "EFFICIENTNET_B7_GRADIENT_BUCKETS")):
        network = create_model(ModelConfig(backbone=backbone, pretrained=False))
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        average = OverlappedGradientAverage(optimizer, None, 25.0)
        try:
            assert tuple(bucket.bytes for bucket in average.buckets) == scale_out.ANCHORS[name].value
        finally:
            average.remove()
