"""`offplan solve --runtime llamacpp` as one library call: the fastest llama.cpp placement that
fits, its command line, and how it compares with --fit's memory-only choice."""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.llamacpp import LlamaScenario
from planner.plan.llamacpp_command import LlamaCommand, llamacpp_command
from planner.solve.ilp import SolverOptions
from planner.solve.llamacpp_baselines import LlamaBaseline, fit_choice, llamacpp_baselines
from planner.solve.llamacpp_ilp import LlamaSolution, solve_llamacpp


@dataclass(frozen=True)
class LlamaResult:
    scenario: LlamaScenario
    solution: LlamaSolution
    command: LlamaCommand
    fit: LlamaBaseline
    baselines: tuple[LlamaBaseline, ...]  # empty unless asked for

    def prefill_tok_s(self, prediction) -> float:
        wl = self.scenario.workload
        return wl.batch * wl.prompt / prediction.prefill_s

    @property
    def speedup_over_fit(self) -> float | None:
        """--fit's total time (prompt + generation) over the plan's; None when --fit fits nothing."""
        if self.fit.prediction is None:
            return None
        return self.fit.prediction.total_s / self.solution.prediction.total_s


def solve_for_llamacpp(scn: LlamaScenario, options: SolverOptions = SolverOptions(), model_path: str = "model.gguf",
                       compare: bool = False) -> LlamaResult:
    solution = solve_llamacpp(scn, options)
    command = llamacpp_command(scn, solution.placement, model_path)
    baselines = tuple(llamacpp_baselines(scn)) if compare else ()
    fit = baselines[0] if baselines else fit_choice(scn)
    return LlamaResult(scn, solution, command, fit, baselines)
