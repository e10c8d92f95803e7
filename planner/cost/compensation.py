"""How much of the compensation branches' CPU time a plan hides behind accelerator work.

Each compensated tensor runs `(x·A)·B` on the CPU while the accelerator computes its
matmul (cost.parallel): the part of the branch longer than the matmul lengthens the
layer's compute path, and its correction going up occupies the link beside the next
stage's prefetch. A stage lasts the longest of its operands (planner/cost/stage.py), so
either may be hidden by the others. `exposed_s` is exactly what the branches add to the
decode step: Σ over stages of max(operands) - max(operands without the branches' share).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.options import compensation_branch
from planner.model.placement import Placement
from planner.cost.evaluate import OptionTables, chosen_options, predict
from planner.cost.stage import OPERANDS


@dataclass(frozen=True)
class CompensationTime:
    """Per decode step, in seconds. `branch_s` = `hidden_s` + `exposed_s`."""

    tensors: int  # compensated tensors (rank > 0)
    branch_s: float  # CPU branch time incl. its activation transfers
    hidden_s: float  # overlapped with accelerator matmuls or weight streaming
    exposed_s: float  # added to the decode step

    @property
    def hidden_fraction(self) -> float:
        return self.hidden_s / self.branch_s if self.branch_s > 0 else 1.0


def compensation_time(tables: OptionTables, placement: Placement) -> CompensationTime:
    """Hidden and exposed CPU branch time of `placement`'s compensation, per decode step."""
    scn = tables.scenario
    tensor, kv = chosen_options(tables, placement)
    prediction = predict(tables, tensor, kv)
    up = tables.rule.term("decode", "activations up")  # the correction sent up
    count, branch_total, exposed = 0, 0.0, 0.0
    for stage, timing in zip(tables.stages, prediction.stages):
        share = dict.fromkeys(OPERANDS, 0.0)  # what the branches add to each operand of this stage
        for t in stage.tensors:
            option = tensor[t.name]
            if option.rank == 0:
                continue
            branch_s = compensation_branch(scn, t, option.rank, scn.decode_rows).total_s
            handoff_s = scn.profile.host.task_overhead_s  # handing the branch over and joining it
            count += 1
            branch_total += branch_s + handoff_s
            # parallel() hides min(matmul, branch), so the branch's excess over the matmul
            # (what it adds to the path) is branch - hidden, plus the hand-off, never hidden.
            share["path"] += max(branch_s - option.decode.hidden_cpu_s, 0.0) + handoff_s
            share[up.operand] += up.of(option)
        operands = {op: timing.decode.operand_s(op) for op in OPERANDS}
        exposed += max(operands.values()) - max(v - share[op] for op, v in operands.items())
    return CompensationTime(count, branch_total, branch_total - exposed, exposed)
