"""The draft search: E, draft memory, choices on shipped profiles, equality with exhaustive solving."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
from rich.console import Console

from assets.random_instances import tight_instance
from planner.cost.options import Scenario
from planner.errors import InfeasiblePlanError, OffplanError
from planner.hardware.profile import load_profile, with_overrides
from planner.solve.ilp import SolverOptions, solve_placement
from planner.model.modelfile import DraftCandidate
from planner.model.presets import preset
from planner.cli.render_search import alternatives_table, draft_summary
from planner.cost.roofline import expected_tokens_per_step
from planner.solve.drafts import Candidate, search, search_plan
from planner.model.spec import ModelSpec, Quantization, Workload

# Fewer layer groups keep the 80-layer ILPs to about a second each.
FAST = SolverOptions(time_limit_s=30, max_groups=4)
WORKLOAD = Workload(batch=1, prompt=512, gen=128)


def llama70b_int4():
    return replace(preset("llama-3.1-70b"), quantization=Quantization(bits=4, group_size=128))


@pytest.fixture(scope="module")
def rtx4060ti():
    return load_profile("rtx4060ti-16g")


@pytest.fixture(scope="module")
def streaming_search(rtx4060ti):
    """70B int4 on a 16 GB card (most weights streamed), a 1B draft at 0.8 and an 8B draft that
    cannot fit beside the target's buffers."""
    drafts = [DraftCandidate("llama-3.2-1b", preset("llama-3.2-1b"), 0.8),
              DraftCandidate("llama-3.1-8b", preset("llama-3.1-8b"), 0.9)]
    return search(llama70b_int4(), rtx4060ti, WORKLOAD, drafts, FAST)


# ---- E -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 2, 5, 8])
def test_expected_tokens_formula_and_limits(gamma):
    assert expected_tokens_per_step(0.0, gamma) == 1.0
    assert expected_tokens_per_step(1.0, gamma) == gamma + 1
    assert expected_tokens_per_step(0.7, 0) == 1.0
    # E = sum_{i=0..g} a^i: the first token always comes, token i needs i accepted proposals.
    assert expected_tokens_per_step(0.6, gamma) == pytest.approx(sum(0.6 ** i for i in range(gamma + 1)))
    assert expected_tokens_per_step(0.999999, gamma) == pytest.approx(gamma + 1, rel=1e-4)


def test_searched_plan_carries_e(streaming_search):
    best = streaming_search.best
    e = expected_tokens_per_step(0.8, best.gamma)
    assert best.expected_tokens == pytest.approx(e)
    assert best.solution.prediction.expected_tokens == pytest.approx(e)
    plan = search_plan(streaming_search)
    assert plan.draft.name == "llama-3.2-1b" and plan.draft.gamma == best.gamma and plan.draft.acceptance == 0.8
    assert plan.predicted.expected_tokens == pytest.approx(e)
    assert plan.evaluate().total_s == pytest.approx(best.total_s, rel=1e-9)


# ---- choices on shipped profiles -------------------------------------------------------------

def test_streaming_heavy_plan_takes_a_draft_with_gamma_above_one(streaming_search):
    result = streaming_search
    assert result.best.draft_name == "llama-3.2-1b"
    assert result.best.gamma > 1
    assert result.no_draft_best is not None and result.no_draft_best.draft_name is None
    assert result.speedup > 1.5
    assert result.best.total_s < result.no_draft_best.total_s


def test_draft_weights_and_kv_count_against_vram(streaming_search):
    best, d = streaming_search.best, preset("llama-3.2-1b")
    vram = best.solution.prediction.vram
    expected = d.weight_bytes + WORKLOAD.batch * (WORKLOAD.context + best.gamma + 1) * d.kv_bytes_per_token
    assert vram.draft_bytes == expected
    assert vram.used_bytes <= vram.capacity_bytes
    # The draft takes VRAM the no-draft plan gives to target weights.
    assert vram.weights_bytes < streaming_search.no_draft_best.solution.prediction.vram.weights_bytes


def test_draft_too_big_is_infeasible_not_raised(streaming_search):
    big = [c for c in streaming_search.candidates if c.draft_name == "llama-3.1-8b"]
    assert [c.gamma for c in big] == list(range(1, 9))
    for c in big:
        assert c.status == "infeasible" and c.solution is None
        assert c.infeasible_resource == "accelerator memory"
        assert "accelerator memory" in c.infeasible_reason


def test_only_a_too_big_draft_gives_no_draft(rtx4060ti):
    result = search(llama70b_int4(), rtx4060ti, WORKLOAD,
                    [DraftCandidate("llama-3.1-8b", preset("llama-3.1-8b"), 0.95)], FAST)
    assert result.best.draft_name is None
    assert result.best is result.no_draft_best
    assert result.scenario.draft is None and result.scenario.gamma == 0
    assert draft_summary(result).startswith("no draft: no draft plan could be used (does not fit")


def test_low_acceptance_gives_no_draft(rtx4060ti):
    result = search(preset("llama-3.1-8b"), rtx4060ti, WORKLOAD,
                    [DraftCandidate("llama-3.2-1b", preset("llama-3.2-1b"), 0.05)], FAST)
    assert result.best.draft_name is None
    drafted = [c for c in result.candidates if c.draft_name]
    assert all(c.per_sequence_s > result.best.per_sequence_s for c in drafted)


def test_measure_acceptance_is_skipped_unless_given(rtx4060ti):
    draft = DraftCandidate("small", preset("llama-3.2-1b"), None)
    skipped = search(llama70b_int4(), rtx4060ti, WORKLOAD, [draft], FAST)
    assert skipped.best.draft_name is None
    (c,) = [c for c in skipped.candidates if c.draft_name == "small"]
    assert c.status == "needs acceptance" and "offplan acceptance" in c.skipped_reason
    given = search(llama70b_int4(), rtx4060ti, WORKLOAD, [draft], FAST, gammas=[4], acceptance={"small": 0.8})
    assert given.best.draft_name == "small" and given.best.acceptance == 0.8 and given.best.gamma == 4


def test_nothing_fits_reraises_the_no_draft_error(rtx4060ti):
    small_host = with_overrides(rtx4060ti, ram_bytes=12 * 2**30)
    with pytest.raises(InfeasiblePlanError) as raised:
        search(llama70b_int4(), small_host, WORKLOAD, [DraftCandidate("d", preset("llama-3.2-1b"), 0.8)], FAST)
    with pytest.raises(InfeasiblePlanError) as direct:
        solve_placement(Scenario(llama70b_int4(), small_host, WORKLOAD), FAST)
    assert str(raised.value) == str(direct.value)
    assert raised.value.resource == "host memory"


@pytest.mark.parametrize("kwargs, field", [
    ({"gammas": [0, 1]}, "gammas"), ({"batches": [0]}, "batches"),
    ({"acceptance": {"nope": 0.5}}, "no draft candidate named 'nope'"),
    ({"acceptance": {"d": 1.5}}, "between 0 and 1"),
])
def test_bad_arguments_name_the_field(rtx4060ti, kwargs, field):
    drafts = [DraftCandidate("d", preset("llama-3.2-1b"), 0.8)]
    with pytest.raises(OffplanError, match=field):
        search(preset("llama-3.2-3b"), rtx4060ti, WORKLOAD, drafts, FAST, **kwargs)


def test_duplicate_draft_names_rejected(rtx4060ti):
    d = DraftCandidate("d", preset("llama-3.2-1b"), 0.8)
    with pytest.raises(OffplanError, match="distinct"):
        search(preset("llama-3.2-3b"), rtx4060ti, WORKLOAD, [d, d], FAST)


# ---- equality with exhaustive solving --------------------------------------------------------

def _exhaustive(scn_of, combos) -> dict[tuple, float]:
    """Seconds per sequence of every combination solved on its own (inf when infeasible)."""
    out = {}
    for key in combos:
        try:
            out[key] = solve_placement(scn_of(*key), SolverOptions()).prediction.total_s / key[2]
        except InfeasiblePlanError:
            out[key] = math.inf
    return out


def _feasible_instance(rng: random.Random) -> Scenario:
    """A tight random instance on which the plan without a draft fits (drafts may not)."""
    while True:
        wl = Workload(batch=1, prompt=rng.choice((8, 32)), gen=rng.choice((16, 64)))
        scn = tight_instance(rng, workload=wl).scenario
        try:
            solve_placement(scn, SolverOptions())
            return scn
        except InfeasiblePlanError:
            continue


def _small_draft(rng: random.Random, spec: ModelSpec, name: str) -> ModelSpec:
    """A one-layer draft sharing the target's vocabulary, small beside it."""
    return ModelSpec(name=name, family="llama", layers=1, hidden=64, intermediate=rng.choice((128, 256)), heads=4,
                     kv_heads=2, vocab=spec.vocab, dtype=spec.dtype, max_context=4096)


# Seeds chosen to cover: a draft wins (6, 7, 11, 12), no draft wins (5), most draft lengths do
# not fit (4), some do not fit at batch 2 (12); each solves in a few seconds.
@pytest.mark.parametrize("seed", [4, 5, 6, 7, 11, 12])
def test_search_equals_exhaustive(seed):
    rng = random.Random(seed)
    scn = _feasible_instance(rng)
    drafts = [DraftCandidate(f"d{i}", _small_draft(rng, scn.spec, f"d{i}"), a) for i, a in enumerate((0.9, 0.5))]
    gammas, batches = range(1, 9), (1, 2)
    result = search(scn.spec, scn.profile, scn.workload, drafts, SolverOptions(), gammas, batches)

    by_name = {d.name: d for d in drafts}

    def scn_of(name, gamma, batch):
        wl = replace(scn.workload, batch=batch)
        if name is None:
            return Scenario(scn.spec, scn.profile, wl)
        d = by_name[name]
        return Scenario(scn.spec, scn.profile, wl, d.spec, gamma, d.acceptance)

    combos = [(None, 0, b) for b in batches] + [(d.name, g, b) for b in batches for d in drafts for g in gammas]
    truth = _exhaustive(scn_of, combos)
    found = {(c.draft_name, c.gamma, c.batch): c for c in result.candidates}
    assert set(found) == set(truth)
    assert result.best.per_sequence_s == pytest.approx(min(truth.values()), rel=1e-9)
    for key, c in found.items():
        if c.status == "solved":
            assert c.per_sequence_s == pytest.approx(truth[key], rel=1e-9)
        elif c.status == "infeasible":
            assert truth[key] == math.inf
        else:  # pruned: the bound is valid and the combination cannot beat the answer
            assert c.status == "pruned"
            assert c.lower_bound_s / c.batch <= truth[key] * (1 + 1e-6)
            assert truth[key] >= result.best.per_sequence_s * (1 - 1e-9)
    assert result.scenario == scn_of(result.best.draft_name, result.best.gamma, result.best.batch)


def test_pruning_skips_most_ilps():
    """On a realistic instance the bound leaves only a few of 17 ILPs to solve."""
    profile = load_profile("rtx4060ti-16g")
    drafts = [DraftCandidate("llama-3.2-1b", preset("llama-3.2-1b"), 0.7),
              DraftCandidate("llama-3.2-3b", preset("llama-3.2-3b"), 0.75)]
    progress: list[str] = []
    result = search(preset("llama-3.1-8b"), profile, WORKLOAD, drafts, FAST, progress=progress.append)
    assert result.count("pruned") >= 8
    assert result.count("solved") + result.count("pruned") + result.count("infeasible") == 17
    assert any(line.startswith("pruned") for line in progress)
    for c in result.candidates:
        if c.status == "pruned":
            assert c.lower_bound_s / c.batch > result.best.per_sequence_s


# ---- rendering -----------------------------------------------------------------------------

def _text(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_summary_and_table(streaming_search):
    best = streaming_search.best
    summary = draft_summary(streaming_search)
    assert summary.startswith(f"draft llama-3.2-1b, γ={best.gamma}: E = {best.expected_tokens:.2f}")
    assert f"{streaming_search.speedup:.2f}x faster than the best plan without a draft" in summary
    text = _text(alternatives_table(streaming_search))
    assert text.count("yes (chosen)") == 1
    assert "no (accelerator memory)" in text
    assert "llama-3.1-8b" in text and "1-8" in text  # eight infeasible lengths share one row
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == 1 + 8 + 1


def test_candidate_status_values():
    solved_like = Candidate("d", 2, 1, None, infeasible_reason="x", acceptance=0.5)
    assert solved_like.status == "infeasible" and solved_like.total_s == math.inf
    assert Candidate("d", 0, 1, None).status == "needs acceptance"
    assert Candidate("d", 3, 1, None, acceptance=0.5, lower_bound_s=2.0).status == "pruned"
