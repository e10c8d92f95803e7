"""Every table the CLI prints, rendered at 80 columns: key cells (names to type back, figures)
appear in full and no line is wider than the terminal. No torch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.table import Table

from planner.cli.render import compare_table, memory_table, placement_table, speed_table
from planner.cli.render_compare import hardware_table
from planner.cli.render_fit import FitTable
from planner.cli.render_gantt import gantt, summary_table
from planner.cli.render_hw import profile_table, profiles_overview_table
from planner.cli.render_run import comparison_table, stage_table
from planner.cli.render_search import alternatives_table
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile, shipped_profile_names
from planner.model.modelfile import DraftCandidate
from planner.model.presets import preset
from planner.model.spec import Workload
from planner.plan.record import make_plan
from planner.simulate.engine import simulate_plan
from planner.simulate.trace import decode_step_events
from planner.solve.baselines import run_baselines
from planner.solve.drafts import search, search_plan
from planner.solve.ilp import SolverOptions

WIDTH = 80
FAST = SolverOptions(time_limit_s=30, max_groups=2)  # the tables, not the best plan, are under test


def render(renderable, width: int = WIDTH) -> str:
    console = Console(record=True, width=width)
    console.print(renderable)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width, text
    return text


def cells_in_full(text: str, *cells: str) -> None:
    """Each cell on one line, unshortened (no '…' anywhere)."""
    assert "…" not in text, text
    for cell in cells:
        assert any(cell in line for line in text.splitlines()), (cell, text)


@pytest.fixture(scope="module")
def drafted():
    """8B on a 12 GB card with two drafts whose names differ only at the end."""
    drafts = [DraftCandidate("llama-3.2-1b", preset("llama-3.2-1b"), 0.75),
              DraftCandidate("llama-3.2-3b", preset("llama-3.2-3b"), 0.8)]
    result = search(preset("llama-3.1-8b"), load_profile("rtx3060"), Workload(batch=1, prompt=512, gen=128),
                    drafts, FAST, gammas=(2,))
    return result, search_plan(result)


def test_hw_list_shows_every_profile_name_at_80_columns():
    names = shipped_profile_names()
    text = render(profiles_overview_table([load_profile(n) for n in names], names))
    cells_in_full(text, *names, "VRAM")
    assert "not shown at this width" in text  # the secondary columns it left out are named
    wide = render(profiles_overview_table([load_profile(n) for n in names], names), width=160)
    assert "not shown" not in wide and "datasheet" in wide


def test_hw_show_at_80_columns():
    text = render(profile_table(load_profile("rtx4090")))
    cells_in_full(text, "memory bandwidth", "1,008 GB/s", "operator overhead", "host → device")


def test_draft_table_keeps_draft_names_apart(drafted):
    result, _ = drafted
    text = render(alternatives_table(result))
    cells_in_full(text, "llama-3.2-1b", "llama-3.2-3b", "(none)")


def test_plan_tables_at_80_columns(drafted):
    _, plan = drafted
    cells_in_full(render(placement_table(plan)), "lm_head", "embed")
    memory = render(memory_table(plan))
    vram, host = plan.predicted.vram, plan.predicted.host
    from planner.units import fmt_bytes
    cells_in_full(memory, "used of available", "draft model", fmt_bytes(vram.capacity_bytes),
                  fmt_bytes(host.capacity_bytes))
    cells_in_full(render(speed_table(plan)), "decode step", "tok/s", "whole workload")


def test_compare_tables_at_80_columns(drafted):
    _, plan = drafted
    scn = Scenario(plan.model, plan.profile, plan.workload)
    baselines = run_baselines(scn)
    text = render(compare_table(plan, baselines))
    cells_in_full(text, "offplan (ILP)", "accelerate", "llamacpp", "stream-all")
    profiles = [(n, load_profile(n)) for n in shipped_profile_names()]
    prediction = next(b.prediction for b in baselines if b.prediction is not None)
    rows = [(name, p, prediction, "") for name, p in profiles[:-1]]
    rows.append((profiles[-1][0], profiles[-1][1], None, "accelerator memory: needs 30.0 GiB; has 16.0 GiB"))
    text = render(hardware_table(rows))
    cells_in_full(text, *(name for name, _ in profiles), "accelerator", "streaming")


def test_simulate_and_run_tables_at_80_columns(drafted):
    _, plan = drafted
    result = simulate_plan(plan)
    cells_in_full(render(summary_table(result)), "decode step", "busy: accelerator", "difference")
    cells_in_full(render(gantt(decode_step_events(result), width=WIDTH)), "accelerator", "h2d", "cpu",
                  "A accelerator compute", "S weight streaming", "T activation transfers", "C CPU compute", "idle")
    rows = [("time to first token", 0.68, 0.7, "s"), ("decode tokens per second", 12.5, 11.9, "tok/s"),
            ("peak accelerator memory", 11.2 * 2**30, 11.0 * 2**30, "bytes")]
    cells_in_full(render(comparison_table(rows, "Measured vs predicted")), "decode tokens per second",
                  "12.50 tok/s", "11.2 GiB")
    stages = [SimpleNamespace(name=f"layers {i}-{i + 9} (mlp stream)", predicted_s=0.0123, measured_s=0.0131,
                              host_attention_s=0.002 * i) for i in range(0, 30, 10)]
    cells_in_full(render(stage_table(stages)), "layers 20-29 (mlp stream)", "12.3 ms", "13.1 ms")


def test_fit_table_drops_optional_columns_last_named_first():
    table = Table(title="t")
    table.add_column("name", no_wrap=True)
    for header in ("a", "b", "c"):
        table.add_column(header, no_wrap=True)
    table.add_row("a-name-that-must-stay-whole", "x" * 20, "y" * 20, "z" * 20)
    text = render(FitTable(table, optional=("a", "b", "c")), width=60)
    cells_in_full(text, "a-name-that-must-stay-whole", "x" * 20)
    assert "z" * 20 not in text and "y" * 20 not in text
    assert "not shown at this width: c, b" in " ".join(text.split())
    wide = render(FitTable(table, optional=("a", "b", "c")), width=200)
    assert "z" * 20 in wide and "not shown" not in wide


def test_llamacpp_flags_are_folded_not_shortened():
    from planner.cli.llamacpp_cmds import baselines_table
    flags = "-ngl 32 -ot '^blk\\.[0-5]\\.(attn_output|ffn_down|ffn_gate|ffn_up)\\.weight$=CPU' -c 2304"
    pred = SimpleNamespace(decode_tokens_per_s=6.48, vram=SimpleNamespace(used_bytes=11 * 2**30))
    text = render(baselines_table([("offplan", flags, pred, 965.0), ("largest -ngl", "-ngl 26", pred, 802.2)]))
    assert "…" not in text
    column = "".join(line.split("│")[2].strip() for line in text.splitlines() if line.startswith("│"))
    assert flags.replace(" ", "") in column.replace(" ", "")
    cells_in_full(text, "largest -ngl", "965.0", "11.0 GiB")
