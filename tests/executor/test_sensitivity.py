"""Rank tables measured by executor.sensitivity against the error compensated modules and
models actually show, and compensate_model's handling of plans, ranks and worker threads."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import pytest
import torch

from conftest import tiny_spec
from executor.compensate_model import WORKER_PREFIX, compensate_model
from executor.compensation import CompensatedLinear
from executor.quant import QuantLinear
from executor.sensitivity import collect_second_moments, random_prompts, sensitivity, synthetic_sensitivity
from executor.weights import synthetic_model
from planner.cost.options import Scenario
from planner.errors import PlanError, SpecError
from planner.hardware.profile import load_profile
from planner.solve.ilp import SolverOptions
from planner.solve.quality import solve_compensated
from planner.model.modelfile import Compensation
from planner.plan.record import make_plan
from planner.model.ranks import check_table, compensation_settings, load_rank_table, quantized_tensors, save_rank_table
from planner.model.spec import Quantization, Workload

RANKS = (0, 4, 8, 16, 32, 64)
BITS, GROUP = 4, 32
LOOPBACK = Path(__file__).resolve().parents[1] / "assets" / "loopback-test.yaml"


@pytest.fixture(autouse=True)
def no_leaked_workers():
    yield
    assert [t for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX)] == []


@pytest.fixture(scope="module")
def setup():
    """Tiny fp32 model, 4 calibration prompts (192 token rows > the widest input, 128), its
    rank table, and the float inputs each matrix saw on those prompts."""
    spec = tiny_spec()
    model = synthetic_model(spec)
    calibration = random_prompts(spec.vocab, prompts=4, tokens=48, seed=1)
    names = [t.name for t in quantized_tensors(spec)]
    inputs = {name: [] for name in names}
    hooks = [model.model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for name in names]
    reference = torch.cat([model(tokens) for tokens in calibration])  # [prompts, t, vocab]
    for hook in hooks:
        hook.remove()
    inputs = {name: torch.cat(xs) for name, xs in inputs.items()}  # [rows, in]
    table = sensitivity(model, spec, BITS, GROUP, RANKS, calibration)
    return spec, model, calibration, names, inputs, reference, table


def _compensated_copy(spec, ranks, moments=None):
    model = synthetic_model(spec)
    # Float matmuls over the dequantized weights: the table describes the quantization error
    # itself, not the bf16 activations of the fused kernels.
    return model, compensate_model(model, ranks, BITS, GROUP, True, moments, cache_dequantized=True)


def _relative_error_sq(y: torch.Tensor, y_ref: torch.Tensor) -> float:
    return float(((y.double() - y_ref.double()) ** 2).sum() / (y_ref.double() ** 2).sum())


def test_measured_output_error_matches_the_table(setup):
    spec, model, _, names, inputs, _, table = setup
    assert table.method == "activation-aware" and table.ranks == RANKS
    moments = {n: (x.double().T @ x.double()) / x.shape[0] for n, x in inputs.items()}  # [in, in]
    checked = 0
    for rank in RANKS:
        _, handle = _compensated_copy(spec, rank, moments)
        with handle:
            for name in names:
                x = inputs[name]
                y_float = x @ model.model.get_submodule(name).weight.detach().T  # [rows, out]
                measured = _relative_error_sq(handle.modules[name](x), y_float)
                predicted = table.output_error[name] ** 2 * table.tensors[name][rank]
                assert measured == pytest.approx(predicted, rel=1e-4, abs=1e-12), (name, rank)
                checked += predicted > 1e-4
    assert checked > len(names)  # real error at several ranks, not only zeros
    assert all(0.03 < e < 0.3 for e in table.output_error.values())  # 4-bit: a few percent


def test_plain_table_is_the_frobenius_error_of_the_factors(setup):
    spec, model, _, names, _, _, _ = setup
    table = sensitivity(model, spec, BITS, GROUP, (0, 8, 32))
    assert table.method == "plain"
    for rank in (0, 8, 32):
        _, handle = _compensated_copy(spec, rank)
        with handle:
            for name in names[:7]:
                weight = model.model.get_submodule(name).weight.detach()  # [out, in]
                eye = torch.eye(weight.shape[1])  # feeding I reads back the effective W.T
                measured = _relative_error_sq(handle.modules[name](eye), weight.T)
                predicted = table.output_error[name] ** 2 * table.tensors[name][rank]
                assert measured == pytest.approx(predicted, rel=1e-4, abs=1e-12)


def test_compensated_logits_approach_the_float_ones_as_the_table_says(setup):
    spec, model, calibration, names, _, reference, table = setup
    moments = collect_second_moments(model, names, calibration)
    errors = {}
    for rank in (0, 4, 8, 16, 32, 10**6):
        compensated, handle = _compensated_copy(spec, rank, moments)
        with handle:
            logits = torch.cat([compensated(tokens) for tokens in calibration])
            if rank:
                assert handle.host_branch_s > 0 and handle.factor_bytes > 0
        errors[rank] = math.sqrt(_relative_error_sq(logits, reference))
    ordered = list(errors.values())
    assert all(b < a for a, b in zip(ordered, ordered[1:]))
    assert errors[0] > 0.05  # 4-bit weights do move the logits
    assert errors[10**6] < 1e-4  # full rank restores the float model up to fp32 rounding
    # Small perturbations add up linearly through the model: the logit error shrinks like the
    # output-energy-weighted error the table predicts for its matrices.
    base = sum(table.output_error[n] ** 2 for n in names)
    for rank in (4, 8, 16, 32):
        predicted = math.sqrt(sum(table.output_error[n] ** 2 * table.tensors[n][rank] for n in names) / base)
        assert errors[rank] / errors[0] == pytest.approx(predicted, rel=0.2), rank


def test_progress_and_synthetic_table_round_trip(tmp_path):
    spec = tiny_spec(layers=1, quantization=Quantization(BITS, GROUP))
    seen = []
    table = synthetic_sensitivity(spec, (0, 8, 16), prompts=2, prompt_tokens=16,
                                  progress=lambda done, total, name: seen.append((done, total, name)))
    names = [t.name for t in quantized_tensors(spec)]
    assert seen == [(i + 1, len(names), n) for i, n in enumerate(names)]
    assert table.model == spec.name and table.bits == BITS and table.group_size == GROUP
    assert set(table.kinds) == {spec.by_name[n].kind for n in names}
    check_table(table, spec)
    path = tmp_path / "ranks.yaml"
    save_rank_table(table, path)
    assert load_rank_table(path) == table
    choices, recovery = compensation_settings(spec, None, load_rank_table(path))
    assert choices == (0, 8, 16)
    assert all(0 < recovery[k][8] < recovery[k][16] <= 1 for k in table.kinds)


def test_sensitivity_rejects_bad_inputs():
    spec = tiny_spec(layers=1)
    model = synthetic_model(spec)
    with pytest.raises(SpecError, match="group_size: 48 does not divide"):
        sensitivity(model, spec, BITS, 48, (0, 8))
    with pytest.raises(SpecError, match="--ranks"):
        sensitivity(model, spec, BITS, GROUP, (0, -1))
    with pytest.raises(SpecError, match="pass --bits and --group-size"):
        synthetic_sensitivity(spec, (0, 8))
    with compensate_model(model, 0, BITS, GROUP):
        pass
    with pytest.raises(SpecError, match="measure sensitivity on the unquantized model"):
        sensitivity(model, spec, BITS, GROUP, (0, 8))


def test_compensate_model_follows_a_plan():
    spec = tiny_spec(layers=1, quantization=Quantization(BITS, GROUP))
    choices, recovery = compensation_settings(spec, Compensation((0, 8, 16)))  # the prior
    scn = Scenario(spec, load_profile(str(LOOPBACK)), Workload(1, 16, 16), rank_choices=choices,
                   rank_recovery=recovery)
    solution = solve_compensated(scn, SolverOptions(quality=0.2))
    plan = make_plan(scn, solution.placement, "ilp", solution.prediction)
    assert plan.placement.ranks
    model = synthetic_model(spec)
    with compensate_model(model, plan) as handle:
        for name, module in handle.modules.items():
            rank = plan.placement.rank(name)
            assert isinstance(module, CompensatedLinear if rank else QuantLinear), name
            assert handle.ranks[name] == rank and (not rank or module.rank == rank)
            assert model.model.get_submodule(name) is module
        assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, spec.vocab)


def test_compensate_model_rejects_bad_ranks():
    spec = tiny_spec(layers=1)
    with pytest.raises(PlanError, match="ranks.layers.5.mlp.up_proj: not a quantized matrix"):
        compensate_model(synthetic_model(spec), {"layers.5.mlp.up_proj": 8}, BITS, GROUP)
    with pytest.raises(PlanError, match="ranks.lm_head"):
        compensate_model(synthetic_model(spec), {"lm_head": 8}, BITS, GROUP)
    with pytest.raises(PlanError, match="whole number >= 0"):
        compensate_model(synthetic_model(spec), {"layers.0.mlp.up_proj": -2}, BITS, GROUP)
    with pytest.raises(SpecError, match="pass bits and group_size"):
        compensate_model(synthetic_model(spec), {"layers.0.mlp.up_proj": 8})
    model = synthetic_model(spec)
    with compensate_model(model, 4, BITS, GROUP):
        with pytest.raises(PlanError, match="already replaced"):
            compensate_model(model, 4, BITS, GROUP)
