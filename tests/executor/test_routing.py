"""`offplan routing` counts each expert's routed tokens on a prompt file; `solve --routing`
plans with the table and the placement table says what share the resident experts take."""

from __future__ import annotations

import pytest
import torch
import yaml

from conftest import offplan_in_process as offplan
from executor.routing import measure_routing
from executor.weights import save_checkpoint, synthetic_model
from planner.errors import SpecError
from planner.model.routing import load_routing
from test_moe_offload import moe_spec


@pytest.fixture()
def checkpoint(tmp_path):
    spec = moe_spec()
    save_checkpoint(synthetic_model(spec, seed=4), spec, tmp_path / "ck")
    return spec, tmp_path / "ck"


def test_counts_are_top_k_choices_of_every_token(checkpoint):
    spec, _ = checkpoint
    model = synthetic_model(spec, seed=4)
    prompts = [torch.randint(0, spec.vocab, (1, n), generator=torch.Generator().manual_seed(n)) for n in (7, 13)]
    table = measure_routing(model, prompts)
    assert table.tokens == 20 and sorted(table.layers) == [0, 1, 2]
    assert all(sum(counts) == 20 * spec.moe.active for counts in table.layers.values())
    # the counting hooks are gone afterwards
    assert "route" not in vars(model.model.layers[0].mlp)


def test_routing_command_then_solve_with_the_table(checkpoint, tmp_path):
    spec, path = checkpoint
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(" ".join(str((7 * i + j) % spec.vocab) for j in range(24)) for i in range(6)))
    out = tmp_path / "routing.yaml"
    result = offplan("routing", path, "--prompts", prompts, "--out", out)
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(out.read_text())
    assert data["version"] == 1 and data["tokens"] == 144 and len(data["layers"][0]) == 8
    table = load_routing(out, spec)
    assert table.top_share(0, 8) == 1.0 and 0.25 <= table.top_share(0, 2) <= 1.0


def test_solve_with_a_routing_table_reports_the_resident_share(tmp_path):
    counts = [1000] * 16 + [10] * 112
    (tmp_path / "routing.yaml").write_text(yaml.safe_dump(
        {"version": 1, "model": "qwen3-30b-a3b", "tokens": 1, "layers": {i: counts for i in range(48)}}))
    model = tmp_path / "m.yaml"
    model.write_text("version: 1\nmodel: qwen3-30b-a3b\nquantization: {bits: 4, group_size: 32}\n")
    result = offplan("solve", model, "--hw", "rtx3060", "--ram", "64GiB", "--routing", tmp_path / "routing.yaml")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.replace("│", " ").split())  # table cells wrap at any width
    assert "on the GPU, taking" in text and "% of routed tokens" in text
    as_json = offplan("solve", model, "--hw", "rtx3060", "--ram", "64GiB", "--routing", tmp_path / "routing.yaml",
                      "--json")
    experts = __import__("json").loads(as_json.stdout)["experts"]
    assert [e["layer"] for e in experts] == list(range(48))
    top = sum(counts[:16]) / sum(counts)
    assert all(e["routed_share"] >= min(e["on_gpu"], 16) / 16 * top - 1e-9 for e in experts)


@pytest.mark.parametrize("layers, match", [({0: [1] * 8}, "expected 128 token counts"),
                                            ({99: [1] * 128}, "not a mixture-of-experts layer"),
                                            ({0: [-1] * 128}, "numbers >= 0")])
def test_bad_tables_are_one_line(tmp_path, layers, match):
    from planner.model.presets import preset
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "layers": layers}))
    with pytest.raises(SpecError, match=match) as info:
        load_routing(path, preset("qwen3-30b-a3b"))
    assert "\n" not in str(info.value)
