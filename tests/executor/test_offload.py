"""The executor runs plans exactly: offloaded runs give the tokens and logits of an
all-resident run, memory stays within the plan, and wrong plans are refused early."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import offplan_in_process as offplan
from planner.cost.options import Scenario
from planner.errors import PlanError
from planner.hardware.profile import load_profile
from planner.model.placement import Placement, uniform_placement
from planner.plan.record import make_plan, save_plan
from planner.model.spec import ModelSpec, Workload
from executor.offload import apply_plan
from executor.run import RunOptions, _planned_vram, run_plan
from executor.streams import Devices
from executor.weights import save_checkpoint, synthetic_model

ASSETS = Path(__file__).parent.parent / "assets"
PROFILE = load_profile(str(ASSETS / "loopback-test.yaml"))
CPU = Devices(torch.device("cpu"), torch.device("cpu"))


def small_spec(**overrides) -> ModelSpec:
    fields = dict(name="offload-test", family="llama", layers=3, hidden=128, intermediate=256, heads=8,
                  kv_heads=2, vocab=512, dtype="fp32", max_context=512)
    fields.update(overrides)
    return ModelSpec(**fields)


def plan_for(spec: ModelSpec, placement: Placement, workload: Workload = Workload(1, 24, 12)):
    ranks = tuple(sorted({0, *placement.ranks.values()}))
    return make_plan(Scenario(spec, PROFILE, workload, rank_choices=ranks), placement, "test")


def mixed_placements(spec: ModelSpec) -> dict[str, Placement]:
    """Plans that stream, compute on the CPU, split the KV cache and stream cpu weights for prefill."""
    names = [t.name for t in spec.tensors()]
    cycle = ("gpu", "stream", "cpu")
    devices = {n: ("cpu" if n == "embed_tokens" else cycle[i % 3]) for i, n in enumerate(names)}
    cpu_tensors = tuple(n for n, d in devices.items() if d == "cpu" and n != "embed_tokens")
    fractions = tuple((0.0, 0.5, 1.0, 0.25)[i % 4] for i in range(spec.layers))
    return {
        "all-stream": uniform_placement(spec, "stream"),
        "all-cpu": uniform_placement(spec, "cpu"),
        "kv-split": uniform_placement(spec, "gpu", 0.5),
        "mixed": Placement(devices, fractions),
        "mixed-prefill-streamed": Placement(devices, fractions[::-1], cpu_tensors[::2]),
    }


@pytest.mark.parametrize("overrides", [{}, {"tied_embeddings": True}, {"family": "qwen2", "attention_bias": True}])
def test_offloaded_runs_produce_the_tokens_of_an_all_resident_run(overrides):
    spec = small_spec(**overrides)
    reference = run_plan(plan_for(spec, uniform_placement(spec, "gpu")), RunOptions(synthetic=True, warmup_steps=1),
                         devices=CPU).measured.tokens
    assert len(reference[0]) == 12 and len(set(reference[0])) > 2  # a real, non-degenerate generation
    for name, placement in mixed_placements(spec).items():
        tokens = run_plan(plan_for(spec, placement), RunOptions(synthetic=True, warmup_steps=1),
                          devices=CPU).measured.tokens
        assert tokens == reference, name


def test_offloaded_logits_equal_plain_logits_over_prefill_and_decode():
    spec = small_spec(layers=4)
    tokens = torch.randint(0, spec.vocab, (2, 20), generator=torch.Generator().manual_seed(1))
    plain = synthetic_model(spec, seed=3)
    plain.setup_caches(2, 32)
    expected = [plain(tokens[:, :16])] + [plain(tokens[:, i:i + 1]) for i in range(16, 20)]
    for name, placement in mixed_placements(spec).items():
        plan = plan_for(spec, placement, Workload(2, 16, 8))
        model = synthetic_model(spec, seed=3)
        handle = apply_plan(model, plan, CPU, max_tokens=32)
        try:
            handle.begin("prefill")
            got = [model(tokens[:, :16])]
            for i in range(16, 20):
                handle.begin("decode")
                got.append(model(tokens[:, i:i + 1]))
        finally:
            handle.close()
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=2e-5, rtol=2e-5, msg=name)


def test_accelerator_memory_stays_within_the_plan():
    spec = small_spec(layers=4)
    for name, placement in mixed_placements(spec).items():
        plan = plan_for(spec, placement)
        report = run_plan(plan, RunOptions(synthetic=True, warmup_steps=1), devices=CPU)
        assert 0 < report.measured.accelerator_peak_bytes <= _planned_vram(report.predicted), name
    streamed = run_plan(plan_for(spec, uniform_placement(spec, "stream")), RunOptions(synthetic=True), devices=CPU)
    weights = sum(t.n_bytes for t in spec.tensors() if t.group != "embed")
    assert streamed.measured.streamed_bytes_per_step == pytest.approx(weights, rel=1e-6)
    # the report compares the planned streamed bytes with the engine's count, not activations
    rows = {name: (predicted, measured) for name, predicted, measured, _ in streamed.comparisons()}
    assert rows["weights streamed per step"] == pytest.approx((weights, weights), rel=1e-6)
    assert rows["link busy per step"][0] > 0 and rows["link busy per step"][1] > 0
    resident = run_plan(plan_for(spec, uniform_placement(spec, "cpu")), RunOptions(synthetic=True), devices=CPU)
    assert not any(name.startswith(("weights streamed", "link busy")) for name, *_ in resident.comparisons())


def test_plan_for_a_cuda_gpu_is_refused_on_a_machine_without_one():
    spec = small_spec()
    plan = make_plan(Scenario(spec, load_profile("rtx4090"), Workload(1, 8, 4)), uniform_placement(spec, "gpu"), "t")
    with pytest.raises(PlanError, match="no CUDA device"):
        run_plan(plan, RunOptions(synthetic=True), devices=CPU)


def test_checkpoint_of_another_model_is_refused_before_loading(tmp_path, monkeypatch):
    spec = small_spec()
    other = dataclasses.replace(spec, kv_heads=4)
    save_checkpoint(synthetic_model(other), other, tmp_path / "ckpt")
    import executor.run as run_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the checkpoint was checked")
    monkeypatch.setattr(run_module, "load_checkpoint", must_not_load)
    with pytest.raises(PlanError, match="kv_heads"):
        run_plan(plan_for(spec, uniform_placement(spec, "gpu")), RunOptions(checkpoint=tmp_path / "ckpt"),
                 devices=CPU)


def test_run_from_a_checkpoint_equals_the_synthetic_run(tmp_path):
    spec = small_spec()
    save_checkpoint(synthetic_model(spec, seed=0), spec, tmp_path / "ckpt")
    plan = plan_for(spec, mixed_placements(spec)["mixed"])
    from_ckpt = run_plan(plan, RunOptions(checkpoint=tmp_path / "ckpt"), devices=CPU).measured.tokens
    synthetic = run_plan(plan, RunOptions(synthetic=True), devices=CPU).measured.tokens
    assert from_ckpt == synthetic


@pytest.mark.slow
def test_run_cli_writes_a_json_report(tmp_path):
    spec = small_spec()
    plan_path = tmp_path / "plan.yaml"
    save_plan(plan_for(spec, mixed_placements(spec)["mixed"]), plan_path)
    out = tmp_path / "report.json"
    result = offplan("run", plan_path, "--synthetic", "--profile-layers", "--json", out)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    metrics = {row["metric"]: row for row in report["comparisons"]}
    assert metrics["decode tokens/s"]["measured"] > 0 and metrics["time to first token"]["measured"] > 0
    assert "Measured vs predicted" in result.stdout
    bad = offplan("run", plan_path)
    assert bad.returncode == 2 and "--synthetic" in bad.stderr and "Traceback" not in bad.stderr


def test_speculative_run_with_an_identical_draft_accepts_everything_and_keeps_the_tokens(tmp_path):
    spec = small_spec()
    save_checkpoint(synthetic_model(spec, seed=0), spec, tmp_path / "ckpt")
    placement = mixed_placements(spec)["mixed"]
    plain = run_plan(plan_for(spec, placement, Workload(1, 24, 17)), RunOptions(checkpoint=tmp_path / "ckpt"),
                     devices=CPU)
    scn = Scenario(spec, PROFILE, Workload(1, 24, 17), draft=dataclasses.replace(spec, name="draft"), gamma=3,
                   acceptance=0.5)
    report = run_plan(make_plan(scn, placement, "test"),
                      RunOptions(checkpoint=tmp_path / "ckpt", draft_checkpoint=tmp_path / "ckpt"), devices=CPU)
    assert report.measured.tokens == plain.measured.tokens
    assert report.measured.acceptance == 1.0 and report.measured.tokens_per_step == 4.0
    assert report.repredicted.expected_tokens == 4.0 and report.predicted.expected_tokens < 4.0


@pytest.mark.slow
def test_acceptance_cli_measures_an_identical_draft_as_one(tmp_path):
    spec = small_spec()
    save_checkpoint(synthetic_model(spec, seed=0), spec, tmp_path / "ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("1 2 3 4 5 6\n7 8 9 10\n")
    result = offplan("acceptance", "--target", tmp_path / "ckpt", "--draft", tmp_path / "ckpt", "--prompts", prompts,
                     "--gamma", "3", "--gen", "9")
    assert result.returncode == 0, result.stderr
    assert "1.000 per token" in result.stdout and "4.00 tokens per verify step" in result.stdout
    prompts.write_text("1 2 x\n")
    bad = offplan("acceptance", "--target", tmp_path / "ckpt", "--draft", tmp_path / "ckpt", "--prompts", prompts)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_measured_trace_respects_dependencies(tmp_path):
    spec = small_spec()
    names = [t.name for t in spec.tensors()]
    devices = {n: ("cpu" if n == "embed_tokens" else ("stream" if "mlp" in n else ("cpu" if "o_proj" in n else "gpu")))
               for n in names}
    plan = plan_for(spec, Placement(devices, (0.0,) * spec.layers))
    events = run_plan(plan, RunOptions(synthetic=True, trace=True), devices=CPU).measured.events
    by_resource = {}
    for e in events:
        by_resource.setdefault(e.resource, []).append(e)
        assert e.end_s >= e.start_s >= 0
    assert {"accelerator", "h2d", "cpu"} <= set(by_resource)
    for resource, evs in by_resource.items():  # one stream, one copy thread, one host: no overlap
        evs.sort(key=lambda e: e.start_s)
        assert all(a.end_s <= b.start_s + 1e-9 for a, b in zip(evs, evs[1:])), resource
    compute = sorted(by_resource["accelerator"], key=lambda e: e.start_s)
    for e in by_resource["h2d"]:  # a stage computes only after its streamed weights arrived
        later = [c for c in compute if c.stage == e.stage and c.start_s >= e.start_s]
        if later:
            assert later[0].start_s >= e.end_s - 1e-9
    for e in by_resource["cpu"]:  # a cpu matmul runs inside its layer's interval
        assert any(c.stage == e.stage and c.start_s <= e.start_s and e.end_s <= c.end_s + 1e-9 for c in compute)


def test_quantized_compensated_plan_runs_like_the_compensated_model_without_offload():
    from planner.model.spec import Quantization
    from executor.compensate_model import compensate_model
    spec = small_spec(quantization=Quantization(bits=4, group_size=32))
    names = [t.name for t in spec.tensors()]
    cycle = ("gpu", "stream", "cpu")
    devices = {n: ("cpu" if n == "embed_tokens" else cycle[i % 3]) for i, n in enumerate(names)}
    ranks = {n: 8 for n, d in devices.items() if d in ("gpu", "stream") and ("proj" in n)}
    placement = Placement(devices, tuple((0.0, 0.5, 1.0)[i % 3] for i in range(spec.layers)), (), ranks)
    plan = plan_for(spec, placement, Workload(1, 16, 10))
    report = run_plan(plan, RunOptions(synthetic=True, warmup_steps=1), devices=CPU)

    reference = synthetic_model(spec, seed=0)
    with compensate_model(reference, plan):
        reference.setup_caches(1, 32, device="cpu")
        prompt = torch.randint(0, spec.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
        token = reference(prompt)[:, -1].argmax(-1, keepdim=True)
        tokens = [int(token)]
        for _ in range(9):
            token = reference(token)[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
    assert report.measured.tokens[0] == tuple(tokens)
    uncompensated = run_plan(plan_for(spec, Placement(devices, placement.kv_host_fraction), Workload(1, 16, 10)),
                             RunOptions(synthetic=True, warmup_steps=1), devices=CPU)
    assert uncompensated.measured.accelerator_peak_bytes < sum(t.rows * t.cols * 4 for t in spec.tensors())
