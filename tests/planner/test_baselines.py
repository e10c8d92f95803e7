"""Baselines (planner/solve/baselines.py): each picks what its tool would pick, the largest share that
fits, scored by the same cost model; and none is ever predicted faster than the ILP plan."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from assets.random_instances import GIB, random_spec, tight_instance, with_memory
from planner.solve.baselines import BASELINES, accelerate, llamacpp, run_baselines, stream_all
from planner.cost.options import Scenario
from planner.cost.terms import acc_workspace_bytes
from planner.errors import InfeasiblePlanError
from planner.hardware.profile import load_profile, with_overrides
from planner.solve.ilp import SolverOptions, solve_placement
from planner.model.modelfile import load_model_file
from planner.model.placement import Placement, with_devices
from planner.cost.evaluate import evaluate, option_tables
from planner.model.presets import preset
from planner.model.spec import Workload

TINY = Path(__file__).resolve().parents[2] / "examples" / "tiny.yaml"
GAP = 1e-6


def check_no_baseline_is_faster(scn: Scenario, options: SolverOptions) -> list:
    tables = option_tables(scn)
    baselines = run_baselines(scn, tables)
    assert [b.name for b in baselines] == list(BASELINES)
    try:
        solution = solve_placement(scn, options, tables)
    except InfeasiblePlanError:
        assert all(b.prediction is None for b in baselines), [(b.name, b.note) for b in baselines]
        return baselines
    assert solution.status == "optimal"
    for b in baselines:
        if b.prediction is None:
            continue
        assert b.prediction.fits
        assert b.prediction.total_s == pytest.approx(evaluate(scn, b.placement).total_s, rel=1e-12)
        assert solution.prediction.total_s <= b.prediction.total_s * (1 + options.gap_rel), (b.name, b.note)
    return baselines


@pytest.mark.parametrize("seed", range(8))
def test_no_baseline_is_faster_than_the_ilp_on_random_problems(seed):
    rng = random.Random(seed)
    inst = tight_instance(rng, spec=random_spec(rng, layers=rng.randint(1, 4), scale=4), below_resident=True)
    check_no_baseline_is_faster(inst.scenario, SolverOptions(gap_rel=GAP, time_limit_s=60.0))


PRESET_CASES = [
    # 8B bf16 (16 GB) on a 12 GB card, long prompt
    ("llama-3.1-8b", "rtx3060", None, None, Workload(1, 2048, 256)),
    # 7B bf16 (15 GB) with VRAM and RAM both cut down
    ("qwen2.5-7b", "rtx4060ti-16g", 8 * GIB, 32 * GIB, Workload(1, 4096, 256)),
]


@pytest.mark.slow
@pytest.mark.parametrize("model,hw,vram,ram,workload", PRESET_CASES, ids=["llama8b-3060", "qwen7b-4060ti-8g"])
def test_no_baseline_is_faster_than_the_ilp_on_real_models(model, hw, vram, ram, workload):
    """Six layer groups (1, 1, 2, 2, 4, rest) close in seconds; more groups take a minute here.
    The baselines' layer boundaries need not align with the groups: the ILP must win anyway."""
    scn = Scenario(preset(model), with_overrides(load_profile(hw), vram, ram), workload)
    baselines = check_no_baseline_is_faster(scn, SolverOptions(time_limit_s=120.0, max_groups=6))
    assert all(b.prediction is not None for b in baselines), "every baseline fits these machines"
    assert all(set(b.placement.devices.values()) != {"gpu"} for b in baselines)  # the model does not fit


# ---- what each tool would pick ------------------------------------------------------------------

@pytest.fixture(scope="module")
def offload_scenario() -> Scenario:
    """Llama 3.1 8B on the RTX 3060 profile: about half the layers fit."""
    return Scenario(preset("llama-3.1-8b"), load_profile("rtx3060"), Workload(1, 2048, 256))


def _layer_devices(spec, placement: Placement) -> list[str]:
    devices = []
    for layer in range(spec.layers):
        kinds = {placement.device(t.name) for t in spec.layer_tensors(layer)}
        assert len(kinds) == 1, f"layer {layer} is split: {kinds}"
        devices.append(kinds.pop())
    return devices


def test_accelerate_fills_vram_from_the_first_layer_and_streams_the_rest(offload_scenario):
    scn = offload_scenario
    result = accelerate(scn, option_tables(scn))
    layers = _layer_devices(scn.spec, result.placement)
    n_gpu = layers.count("gpu")
    assert layers == ["gpu"] * n_gpu + ["stream"] * (scn.spec.layers - n_gpu)
    assert 0 < n_gpu < scn.spec.layers
    assert result.note == f"{n_gpu} of {scn.spec.layers} layers on the GPU"
    assert result.placement.device("embed_tokens") == "gpu"
    assert result.placement.device("lm_head") == "stream"
    assert result.placement.kv_host_fraction == (0.0,) * scn.spec.layers
    assert result.prediction.fits
    # greedy: one more layer on the GPU would not fit
    bigger = with_devices(result.placement, {t.name: "gpu" for t in scn.spec.layer_tensors(n_gpu)})
    assert not evaluate(scn, bigger).fits


def test_llamacpp_offloads_the_last_layers_and_keeps_the_rest_on_the_cpu(offload_scenario):
    scn = offload_scenario
    result = llamacpp(scn, option_tables(scn))
    layers = _layer_devices(scn.spec, result.placement)
    ngl = layers.count("gpu")
    assert layers == ["cpu"] * (scn.spec.layers - ngl) + ["gpu"] * ngl
    assert result.note == f"-ngl {ngl}"
    assert result.placement.kv_host_fraction == tuple(1.0 if d == "cpu" else 0.0 for d in layers)
    assert result.placement.device("embed_tokens") == "cpu"
    assert result.placement.device("lm_head") == "cpu"  # output layer only with every layer offloaded
    cpu_matrices = {t.name for t in scn.spec.tensors() if result.placement.device(t.name) == "cpu"
                    and t.group != "embed"}
    assert set(result.placement.prefill_streamed) == cpu_matrices  # large batches copy weights up
    # largest -ngl: one more offloaded layer would not fit
    nxt = scn.spec.layers - ngl - 1
    bigger = with_devices(result.placement, {t.name: "gpu" for t in scn.spec.layer_tensors(nxt)})
    kv = list(bigger.kv_host_fraction)
    kv[nxt] = 0.0
    assert not evaluate(scn, replace(bigger, kv_host_fraction=tuple(kv))).fits


def test_stream_all_streams_every_matrix(offload_scenario):
    scn = offload_scenario
    result = stream_all(scn, option_tables(scn))
    for t in scn.spec.tensors():
        assert result.placement.device(t.name) == ("cpu" if t.group == "embed" else "stream")
    assert len(set(result.placement.kv_host_fraction)) == 1
    assert result.note.startswith("KV 0% on the host")
    assert result.prediction.fits


def test_when_everything_fits_accelerate_keeps_it_all_on_the_gpu_and_the_ilp_is_no_slower():
    spec = load_model_file(str(TINY)).spec
    scn = Scenario(spec, load_profile("rtx4090"), Workload(1, 256, 64))
    baselines = {b.name: b for b in run_baselines(scn)}
    assert set(baselines["accelerate"].placement.devices.values()) == {"gpu"}
    assert baselines["llamacpp"].note == f"-ngl {spec.layers + 1}"
    solution = solve_placement(scn, SolverOptions(gap_rel=GAP))
    assert solution.prediction.total_s <= baselines["accelerate"].prediction.total_s * (1 + GAP)
    assert solution.prediction.total_s < baselines["stream-all"].prediction.total_s


def test_accelerate_note_counts_decoder_layers_only():
    spec = load_model_file(str(TINY)).spec
    scn = Scenario(spec, load_profile("rtx4090"), Workload(1, 256, 64))
    result = accelerate(scn, option_tables(scn))
    assert set(result.placement.devices.values()) == {"gpu"}
    assert result.note == f"{spec.layers} of {spec.layers} layers on the GPU"


def test_a_baseline_that_cannot_fit_says_why_and_the_ilp_still_plans():
    """VRAM holds the workspace and a streaming buffer but not the whole KV cache: accelerate
    (KV always on the GPU) has no answer, the ILP moves KV to the host."""
    spec = load_model_file(str(TINY)).spec
    workload = Workload(4, 2048, 1024)
    loose = Scenario(spec, load_profile("rtx4090"), workload)
    kv_bytes = workload.batch * workload.context * spec.kv_bytes_per_token
    largest_layer = max(sum(t.n_bytes for t in spec.layer_tensors(i)) for i in range(spec.layers))
    assert kv_bytes > 4 * largest_layer  # the KV cache dominates
    usable = spec.norm_bytes + acc_workspace_bytes(loose) + 2 * largest_layer + int(0.6 * kv_bytes)
    profile = loose.profile
    scn = replace(loose, profile=with_memory(profile, usable + profile.reserve_bytes, profile.host.memory_bytes))
    results = {b.name: b for b in run_baselines(scn)}
    assert results["accelerate"].placement is None and results["accelerate"].prediction is None
    assert "KV cache" in results["accelerate"].note
    assert results["stream-all"].prediction is not None
    assert results["stream-all"].placement.kv_host_fraction[0] > 0
    # two layer groups still contain stream-all's uniform placement, and close in a second
    solution = solve_placement(scn, SolverOptions(gap_rel=1e-4, time_limit_s=60.0, max_groups=2))
    assert sum(solution.placement.kv_host_fraction) > 0
    assert solution.prediction.total_s <= results["stream-all"].prediction.total_s * (1 + 1e-4)
