"""Plan files (planner/plan/record.py): exact YAML round trip, provenance, and refusal of plans that
were edited by hand or that do not describe the model they carry."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import yaml

from assets.random_instances import random_profile
from planner.cost.options import Scenario
from planner.errors import PlanError
from planner.hardware.profile import load_profile
from planner.solve.ilp import SolverOptions, solve_placement
from planner.model.placement import Placement, check_placement
from planner.plan.record import load_plan, make_plan, plan_from_data, plan_to_yaml, save_plan, with_profile
from planner.cost.evaluate import evaluate
from planner.schema import stable_hash
from planner.model.spec import ModelSpec, Quantization, Workload


def _spec(**overrides) -> ModelSpec:
    fields = dict(name="plan-test", family="llama", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2,
                  vocab=96, dtype="bf16", max_context=256, quantization=Quantization(4, 32),
                  tied_embeddings=True)
    fields.update(overrides)
    return ModelSpec(**fields)


def _rich_scenario(**fields) -> Scenario:
    """Quantized, tied embeddings, a draft model and compensation ranks: every optional section."""
    draft = ModelSpec(name="plan-draft", family="llama", layers=1, hidden=32, intermediate=64, heads=2,
                      kv_heads=1, vocab=96, dtype="bf16", max_context=256)
    base = dict(draft=draft, gamma=3, acceptance=0.6, rank_choices=(0, 8))
    base.update(fields)
    return Scenario(_spec(), random_profile(random.Random(3)), Workload(1, 32, 8), **base)


def _rich_placement(spec: ModelSpec) -> Placement:
    devices = {}
    for t in spec.tensors():
        devices[t.name] = {"up_proj": "cpu", "down_proj": "cpu", "v_proj": "stream"}.get(t.kind, "gpu")
    return Placement(devices, (0.25, 0.625), ("layers.0.mlp.up_proj", "layers.1.mlp.down_proj"),
                     {"layers.1.self_attn.q_proj": 8, "layers.0.self_attn.v_proj": 8})


@pytest.fixture
def rich_plan():
    scn = _rich_scenario()
    return make_plan(scn, _rich_placement(scn.spec), "ilp", solver="HiGHS", solver_status="optimal",
                     solve_time_s=0.25, objective_s=1.5)


def test_save_then_load_gives_the_same_plan(rich_plan, tmp_path):
    p = rich_plan
    assert p.model.quantization is not None and p.model.tied_embeddings and p.draft is not None
    assert any(c > 0 for c in p.placement.kv_host_fraction) and p.placement.prefill_streamed and p.placement.ranks
    path = tmp_path / "plan.yaml"
    save_plan(p, path)
    back = load_plan(path)
    assert back == p
    assert plan_to_yaml(back) == path.read_text()  # and it writes the same bytes again
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.yaml"]  # no temporary file left behind


def test_a_solved_plan_round_trips_and_its_prediction_is_reproducible(tmp_path):
    scn = Scenario(_spec(), random_profile(random.Random(5)), Workload(2, 48, 16))
    solution = solve_placement(scn, SolverOptions(gap_rel=1e-6))
    plan = make_plan(scn, solution.placement, "ilp", solution.prediction, solution.solver, solution.status,
                     solution.solve_time_s, solution.objective_s)
    save_plan(plan, tmp_path / "p.yaml")
    back = load_plan(tmp_path / "p.yaml")
    assert back == plan
    assert back.evaluate().total_s == pytest.approx(plan.predicted.total_s, rel=1e-12)
    assert back.provenance.objective_s == pytest.approx(plan.predicted.total_s, rel=1e-6)


def test_rank_recovery_tables_round_trip(tmp_path):
    scn = _rich_scenario(rank_recovery={"q_proj": {8: 0.3}, "v_proj": {8: 0.5}})
    plan = make_plan(scn, _rich_placement(scn.spec), "ilp")
    assert plan.predicted.recovered_error > 0
    save_plan(plan, tmp_path / "plan.yaml")
    back = load_plan(tmp_path / "plan.yaml")
    assert back.rank_recovery == plan.rank_recovery
    assert back.evaluate().recovered_error == pytest.approx(plan.predicted.recovered_error)


def test_provenance_names_model_profile_and_solver(rich_plan):
    pv = rich_plan.provenance
    assert pv.strategy == "ilp" and pv.solver == "HiGHS" and pv.solver_status == "optimal"
    assert pv.model_hash == stable_hash(rich_plan.model)
    assert pv.profile_hash == rich_plan.profile.digest and pv.profile_name == rich_plan.profile.name
    assert pv.created.endswith("+00:00")


def test_summary_matches_the_prediction(rich_plan):
    prediction = rich_plan.evaluate()
    pr = rich_plan.predicted
    assert pr.total_s == pytest.approx(prediction.total_s, rel=1e-12)
    assert pr.ttft_s == pytest.approx(prediction.ttft_s, rel=1e-12)
    assert pr.decode_tokens_per_s == pytest.approx(prediction.decode_tokens_per_s, rel=1e-12)
    assert pr.expected_tokens == pytest.approx((1 - 0.6**4) / 0.4)
    assert len(pr.stages) == rich_plan.model.layers + 1
    assert pr.host.kv_bytes == prediction.host.kv_bytes > 0


# ---- refusing bad plans -------------------------------------------------------------------------

def _plan_data(plan) -> dict:
    return yaml.safe_load(plan_to_yaml(plan))


def test_a_plan_whose_model_section_was_edited_is_refused(rich_plan, tmp_path):
    data = _plan_data(rich_plan)
    data["model"]["intermediate"] = 256  # same tensor names, different shapes
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    message = str(info.value)
    assert str(path) in message and "edited" in message and "\n" not in message


def test_a_plan_for_another_model_is_refused(rich_plan, tmp_path):
    """The model section describes three layers (and its hash is consistent), the placement two."""
    data = _plan_data(rich_plan)
    data["model"]["layers"] = 3
    other = replace(rich_plan.model, layers=3)
    data["provenance"]["model_hash"] = stable_hash(other)
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(PlanError, match=r"layers\.2\..*another model"):
        load_plan(path)


def test_placement_for_another_model_names_the_first_mismatch(rich_plan):
    spec = rich_plan.model
    bigger = replace(spec, name="bigger", layers=3)
    with pytest.raises(PlanError, match="another model"):
        check_placement(bigger, rich_plan.placement)
    smaller = replace(spec, name="smaller", layers=1)
    with pytest.raises(PlanError, match=r"'layers\.1\.[a-z_.]+' is not part of model 'smaller'"):
        check_placement(smaller, rich_plan.placement)


@pytest.mark.parametrize("edit,needle", [
    (lambda d: d.pop("version"), "version"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(colour="blue"), "colour"),
    (lambda d: d["placement"]["devices"].update({"lm_head": "disk"}), "lm_head"),
    (lambda d: d["placement"].update(kv_host_fraction=[0.5]), "kv_host_fraction"),
    (lambda d: d["placement"].update(kv_host_fraction=[0.5, 1.5]), "kv_host_fraction"),
    (lambda d: d["placement"].update(prefill_streamed=["layers.0.self_attn.q_proj"]), "prefill_streamed"),
    (lambda d: d["placement"]["devices"].pop("lm_head"), "lm_head"),
])
def test_malformed_plans_are_refused_with_the_field(rich_plan, edit, needle):
    data = _plan_data(rich_plan)
    edit(data)
    with pytest.raises(PlanError) as info:
        plan_from_data(data)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_and_malformed_plan_files(tmp_path):
    with pytest.raises(PlanError, match="file not found"):
        load_plan(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: [unclosed\n")
    with pytest.raises(PlanError, match="malformed YAML"):
        load_plan(bad)


def test_with_profile_keeps_the_placement_and_repredicts(rich_plan):
    other = load_profile("rtx4090")
    moved = with_profile(rich_plan, other)
    assert moved.placement == rich_plan.placement and moved.model == rich_plan.model
    assert moved.draft == rich_plan.draft
    assert moved.profile == other
    assert moved.predicted.total_s == pytest.approx(evaluate(rich_plan.scenario(other), rich_plan.placement).total_s)
    assert moved.predicted.total_s != pytest.approx(rich_plan.predicted.total_s)


def test_save_plan_creates_parent_directories_and_leaves_no_temporary_file(rich_plan, tmp_path):
    target = tmp_path / "sub" / "plan.yaml"
    save_plan(rich_plan, target)  # the library creates parent directories; the CLI refuses first
    assert load_plan(target) == rich_plan
    assert [x.name for x in target.parent.iterdir()] == ["plan.yaml"]


def test_plan_files_are_plain_yaml(rich_plan):
    text = plan_to_yaml(rich_plan)
    assert text.startswith("version: 1\n")
    assert "!!" not in text  # no python-specific tags
