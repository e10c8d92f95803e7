"""Rank tables (ranks.yaml), the compensation prior, and the ILP's quality modes against
brute force over every option combination of small instances."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import numpy as np
import pytest
import yaml

from assets.random_instances import GIB, memory_span, n_combinations, random_profile, random_spec, with_memory
from planner.cost import attention
from planner.cost.compensation import compensation_time
from planner.cost.options import Scenario
from planner.errors import InfeasiblePlanError, OffplanError, SpecError
from planner.solve.ilp import SolverOptions, check_options, solve_placement
from planner.solve.quality import parse_quality, solve_compensated, uncompensated
from planner.model.modelfile import Compensation
from planner.cost.evaluate import chosen_options, option_tables, predict
from planner.model.ranks import (RankTable, check_table, compensation_settings, default_table, interpolate_remaining,
                           load_rank_table, prior_recovered, rank_recovery, save_rank_table)
from planner.schema import from_dict
from planner.model.spec import ModelSpec, Quantization, Workload

RANKS = (0, 4, 8)
SEEDS = range(6)
EXACT = SolverOptions(gap_rel=1e-9, time_limit_s=60)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def _spec(**overrides) -> ModelSpec:
    fields = dict(name="tiny-q", family="llama", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2,
                  vocab=96, dtype="fp32", max_context=256, quantization=Quantization(4, 32))
    fields.update(overrides)
    return ModelSpec(**fields)


def _table(spec: ModelSpec) -> RankTable:
    tensors = {}
    for t in spec.tensors():
        if t.group in ("attn", "mlp"):
            tensors[t.name] = {0: 1.0, 8: 0.6 - 0.01 * t.layer, 16: 0.3, 32: 0.05}
    return RankTable(spec.name, 4, 32, (0, 8, 16, 32), tensors, {}, {t: 0.09 for t in tensors}, True,
                     "activation-aware")


# ---- ranks.yaml ------------------------------------------------------------------------------------

def test_round_trip_keeps_whole_number_ranks(tmp_path):
    table = _table(_spec())
    path = tmp_path / "ranks.yaml"
    save_rank_table(table, path)
    loaded = load_rank_table(path)
    assert loaded == table
    assert all(isinstance(r, int) for curve in loaded.tensors.values() for r in curve)
    assert not list(tmp_path.glob(".ranks.yaml.*"))  # the temporary file was renamed away


def test_kinds_are_the_mean_over_layers():
    recovery = rank_recovery(_table(_spec()), (0, 8, 16))
    assert set(recovery) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert recovery["q_proj"][8] == pytest.approx(1 - (0.6 + 0.59) / 2)
    assert recovery["q_proj"][16] == pytest.approx(0.7)
    assert recovery["q_proj"][0] == 0.0


def _write(tmp_path, data) -> str:
    path = tmp_path / "ranks.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


GOOD = {"version": 1, "model": "m", "bits": 4, "group_size": 32, "ranks": [0, 8],
        "tensors": {"layers.0.mlp.up_proj": {0: 1.0, 8: 0.5}}}


@pytest.mark.parametrize("change, words", [
    ({"colour": "red"}, ["unknown key 'colour'", "allowed"]),
    ({"version": 2}, ["version 2 is not supported"]),
    ({"ranks": [0, -8]}, ["ranks", ">= 0"]),
    ({"bits": 0}, ["bits", "positive"]),
    ({"method": "magic"}, ["method", "activation-aware"]),
    ({"tensors": {"layers.0.mlp.up_proj": {0: 1.0, 8: 1.5}}}, ["tensors.layers.0.mlp.up_proj.8", "outside 0..1"]),
    ({"tensors": {"layers.0.mlp.up_proj": {0: 0.4, 8: 0.5}}}, ["rises from 0.4 at rank 0", "rank 8"]),
    ({"tensors": {"layers.0.mlp.up_proj": {0: 1.0}}}, ["tensors.layers.0.mlp.up_proj", "no entry for rank 8"]),
    ({"tensors": {"layers.0.mlp.up_proj": {0: 1.0, "eight": 0.5}}}, ["rank 'eight' is not a whole number"]),
    ({"tensors": {}}, ["no 'tensors:' or 'kinds:'"]),
    ({"output_error": {"layers.9.mlp.up_proj": 0.1}}, ["output_error.layers.9.mlp.up_proj", "not listed"]),
])
def test_bad_ranks_yaml_names_the_field(tmp_path, change, words):
    path = _write(tmp_path, {**GOOD, **change})
    with pytest.raises(SpecError) as info:
        load_rank_table(path)
    message = str(info.value)
    assert message.startswith(path)
    for word in words:
        assert word in message
    assert "\n" not in message


def test_missing_version_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="missing 'version: 1'"):
        load_rank_table(_write(tmp_path, {k: v for k, v in GOOD.items() if k != "version"}))
    with pytest.raises(SpecError, match="file not found"):
        load_rank_table(tmp_path / "absent.yaml")


def test_table_for_another_model_or_quantization_is_rejected():
    spec = _spec()
    table = _table(spec)
    check_table(table, spec)
    with pytest.raises(SpecError, match="not a quantized matrix of model"):
        check_table(table, _spec(layers=1))
    with pytest.raises(SpecError, match="re-run offplan sensitivity"):
        check_table(table, _spec(quantization=Quantization(8, 32)))


# ---- prior, interpolation, settings -----------------------------------------------------------------

@pytest.mark.parametrize("rows, cols, rank", [(300, 300, 30), (400, 100, 10), (128, 512, 64)])
def test_prior_matches_the_spectrum_of_gaussian_matrices(rows, cols, rank):
    rng = np.random.default_rng(0)
    sigma2 = np.linalg.svd(rng.standard_normal((rows, cols)), compute_uv=False) ** 2
    measured = sigma2[:rank].sum() / sigma2.sum()
    assert prior_recovered(rows, cols, rank) == pytest.approx(measured, abs=0.02)


def test_prior_is_monotone_and_bounded():
    values = [prior_recovered(256, 1024, r) for r in (0, 1, 8, 64, 128, 255, 256, 4096)]
    assert values[0] == 0.0 and values[-2] == values[-1] == 1.0
    assert all(b > a for a, b in zip(values[:-2], values[1:-1]))
    table = default_table(_spec(), (0, 8, 32))
    assert table.method == "prior" and table.tensors == {}
    # A wide matrix's error spreads over fewer directions than a square one's per unit rank.
    assert table.kinds["k_proj"][8] < table.kinds["q_proj"][8]


def test_interpolation_never_overstates_recovery():
    sigma2 = np.sort(np.random.default_rng(1).standard_normal((64, 64)) ** 2 @ np.ones(64))[::-1]
    tail = {r: float(sigma2[r:].sum() / sigma2.sum()) for r in range(65)}
    curve = {r: tail[r] for r in (0, 8, 32, 64)}
    for r in range(65):
        assert interpolate_remaining(curve, r) >= tail[r] - 1e-12
    assert interpolate_remaining(curve, 8) == tail[8]
    assert interpolate_remaining({0: 1.0, 8: 0.4}, 100) == 0.4


def test_settings_priority_and_model_yaml_keys():
    spec = _spec()
    assert compensation_settings(replace(spec, quantization=None)) == ((0,), {})
    choices, prior = compensation_settings(spec)
    assert choices == (0, 8, 16, 32, 64, 128) and 0 < prior["q_proj"][8] < prior["q_proj"][16] < 1
    # model.yaml's inline table holds *recovered* fractions; the schema hands rank keys over as text.
    inline = from_dict(Compensation, {"ranks": [0, 8, 16], "table": {"q_proj": {8: 0.5, 16: 0.75}}},
                       "compensation", SpecError)
    choices, recovery = compensation_settings(spec, inline)
    assert choices == (0, 8, 16)
    assert recovery["q_proj"] == {0: 0.0, 8: 0.5, 16: 0.75}
    _, same_ranks_prior = compensation_settings(spec, Compensation((0, 8, 16)))
    assert recovery["k_proj"] == same_ranks_prior["k_proj"]  # kinds the inline table omits keep the prior
    # A measured table wins over the inline one.
    _, measured = compensation_settings(spec, inline, _table(spec))
    assert measured["q_proj"][8] == pytest.approx(1 - 0.595)
    with pytest.raises(SpecError, match="compensation.table.x_proj"):
        compensation_settings(spec, Compensation((0, 8), {"x_proj": {8: 0.5}}))


# ---- the ILP against brute force ----------------------------------------------------------------------

def _hiding_profile(rng: random.Random):
    """A random machine whose host is fast beside its accelerator, so that some branches hide."""
    p = random_profile(rng)
    host = replace(p.host, mem_bw_gbps=p.host.mem_bw_gbps * rng.uniform(2, 20),
                   flops_tflops={"fp32": 0.05 * rng.uniform(0.5, 4)},
                   op_overhead_s=p.accelerator.op_overhead_s * rng.uniform(0.05, 0.5))
    return replace(p, host=host, link=replace(p.link, latency_s=p.link.latency_s * rng.uniform(0.01, 0.2)))


def _instance(seed: int, budget: int = 4000):
    """A 1-layer quantized model with ranks (0, 4, 8), tight VRAM, and option tables cut down
    so brute force stays small: every layer tensor keeps all ranks on one device."""
    rng = random.Random(seed)
    spec = replace(random_spec(rng, layers=1, ffn="plain"), quantization=Quantization(4, 16))
    recovery = {k: {0: 0.0, 4: rng.uniform(0.1, 0.4), 8: rng.uniform(0.45, 0.8)} for k in KINDS}
    workload = Workload(batch=1, prompt=rng.choice((8, 32)), gen=rng.choice((16, 64)))
    profile = _hiding_profile(rng)
    loose = Scenario(spec, profile, workload, rank_choices=RANKS, rank_recovery=recovery)
    lo_v, hi_v, _, _ = memory_span(option_tables(loose))
    scn = replace(loose, profile=with_memory(profile, int(lo_v + rng.uniform(0.3, 0.9) * (hi_v - lo_v)), 64 * GIB))
    tables = option_tables(scn)
    keep = {}
    for name, options in tables.tensor.items():
        devices = sorted({o.device for o in options if o.rank > 0})
        if not devices:
            keep[name] = rng.sample(options, min(2, len(options)))
            continue
        main = rng.choice(devices)
        chosen = [o for o in options if o.device == main]
        if main == "gpu" or rng.random() < 0.5:  # a VRAM-free way out keeps tight instances feasible
            chosen.append(rng.choice([o for o in options if o.device != "gpu" and o.rank == 0]))
        keep[name] = chosen
    tables = replace(tables, tensor=keep)
    while n_combinations(tables) > budget:  # drop the extra option of a streamed tensor
        extra = [n for n in keep if len(keep[n]) > 3 and keep[n][0].device == "stream"]
        if not extra:
            break
        keep[extra[0]] = keep[extra[0]][:3]
        tables = replace(tables, tensor=keep)
    return scn, tables


@pytest.fixture(scope="module")
def instances():
    """seed -> (scenario, restricted tables, every fitting combination), with two KV levels."""
    out = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "KV_LEVELS", (0.0, 1.0))
        for seed in SEEDS:
            scn, tables = _instance(seed)
            out[seed] = scn, tables, _enumerate(tables)
    return out


def _enumerate(tables):
    """(total_s, recovered, uses_compensation) of every combination that fits."""
    names = list(tables.tensor)
    rows = []
    for kv in itertools.product(tables.kv, repeat=tables.scenario.spec.layers):
        for combo in itertools.product(*(tables.tensor[n] for n in names)):
            prediction = predict(tables, dict(zip(names, combo)), list(kv))
            if prediction.fits:
                rows.append((prediction.total_s, prediction.recovered_error, any(o.rank for o in combo)))
    return rows



@pytest.mark.parametrize("seed", SEEDS)
def test_quality_fraction_matches_brute_force(instances, seed):
    scn, tables, rows = instances[seed]
    best_recovered = max(r for _, r, _ in rows)
    quality = round(random.Random(seed).uniform(0.3, 0.9) * best_recovered, 6)
    fastest = min(t for t, r, _ in rows if r >= quality - 1e-12)
    solution = solve_placement(scn, replace(EXACT, quality=quality), tables)
    assert solution.prediction.recovered_error >= quality - 1e-9
    assert solution.prediction.total_s == pytest.approx(fastest, rel=1e-6)
    assert solution.prediction.fits


@pytest.mark.parametrize("seed", SEEDS)
def test_quality_max_matches_brute_force(instances, seed):
    scn, tables, rows = instances[seed]
    t0 = min(t for t, _, compensated in rows if not compensated)
    budget = 1.02 * t0
    most = max(r for t, r, _ in rows if t <= budget * (1 + 1e-9))
    solution = solve_compensated(scn, replace(EXACT, quality_mode="max"), tables)
    assert solution.prediction.total_s <= budget * (1 + 1e-6)
    assert solution.prediction.recovered_error == pytest.approx(most, abs=1e-6)
    # Among the plans recovering that much, the fastest (the time tie-break).
    fastest = min(t for t, r, _ in rows if r >= most - 1e-9 and t <= budget * (1 + 1e-9))
    assert solution.prediction.total_s == pytest.approx(fastest, rel=1e-5)


def test_quality_max_compensates_within_the_slack_only(instances):
    compensated = 0
    for scn, tables, _ in instances.values():
        t0 = solve_placement(scn, EXACT, uncompensated(tables)).prediction.total_s
        tight = solve_compensated(scn, replace(EXACT, quality_mode="max", slack=0.0), tables)
        assert tight.prediction.total_s <= t0 * (1 + 1e-6)
        loose = solve_compensated(scn, replace(EXACT, quality_mode="max"), tables)
        assert loose.prediction.recovered_error >= tight.prediction.recovered_error - 1e-9
        compensated += loose.prediction.recovered_error > 0
    assert compensated >= 3  # the brute-force comparison is not only about rank 0


def test_compensation_time_is_the_step_time_the_ranks_add(instances):
    checked = 0
    for scn, tables, _ in instances.values():
        solution = solve_compensated(scn, replace(EXACT, quality_mode="max", slack=0.3), tables)
        placement = solution.placement
        if not placement.ranks:
            continue
        timing = compensation_time(tables, placement)
        without = predict(tables, *chosen_options(uncompensated(tables), replace(placement, ranks={})))
        assert timing.tensors == len(placement.ranks)
        assert timing.hidden_s + timing.exposed_s == pytest.approx(timing.branch_s)
        assert timing.exposed_s == pytest.approx(solution.prediction.decode_step_s - without.decode_step_s,
                                                 abs=1e-12)
        assert 0.0 <= timing.hidden_fraction <= 1.0
        checked += 1
    assert checked >= 2


def test_quality_errors_name_the_flag(instances):
    scn, tables, _ = instances[0]
    with pytest.raises(InfeasiblePlanError, match=r"--quality 0.99: the offered ranks recover at most"):
        solve_placement(scn, replace(EXACT, quality=0.99), tables)
    plain = Scenario(replace(scn.spec, quantization=None), scn.profile, scn.workload)
    with pytest.raises(SpecError, match="--quality needs a quantized model"):
        solve_compensated(plain, SolverOptions(quality_mode="max"))
    assert parse_quality("max") == ("max", None)
    assert parse_quality(" 0.25") == (None, 0.25)
    assert parse_quality(None) == (None, None)
    with pytest.raises(OffplanError, match="--quality"):
        parse_quality("most")
    for bad in ("1.5", "-0.1"):
        with pytest.raises(OffplanError, match="--quality"):
            check_options(SolverOptions(quality=parse_quality(bad)[1]), scn.spec)


def test_rank_table_drives_the_plan():
    """A kind whose table says its branch recovers nothing never gets a rank."""
    spec = _spec(layers=1)
    table = _table(spec)
    useless = {n: ({r: 1.0 for r in table.ranks} if n.endswith("o_proj") else c) for n, c in table.tensors.items()}
    table = replace(table, tensors=useless)
    choices, recovery = compensation_settings(spec, Compensation((0, 8, 16)), table)
    assert recovery["o_proj"] == {0: 0.0, 8: 0.0, 16: 0.0}
    profile = _hiding_profile(random.Random(3))
    scn = Scenario(spec, profile, Workload(1, 16, 16), rank_choices=choices, rank_recovery=recovery)
    solution = solve_compensated(scn, replace(EXACT, quality_mode="max", slack=1.0))
    assert solution.placement.ranks  # compensation pays here...
    assert not any(name.endswith("o_proj") for name in solution.placement.ranks)  # ...but not for o_proj
    n_quantized = sum(1 for t in spec.tensors() if t.group in ("attn", "mlp"))
    assert math.isclose(solution.prediction.recovered_error,
                        sum(recovery[spec.by_name[n].kind][r] for n, r in solution.placement.ranks.items())
                        / n_quantized, rel_tol=1e-9)
