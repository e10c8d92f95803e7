"""What llama.cpp users pick today, scored by the same llama.cpp cost model (DESIGN §5).

- `--fit`: llama.cpp's memory-only fitting (common/fit.cpp, on by default since late 2025):
  offload everything; if that leaves less than its target margin free (-fitt, 1024 MiB per
  device), dense models give up whole layers from the front (-ngl lowered), MoE models first
  move the experts of layer after layer, front to back, to host memory (--n-cpu-moe), then
  whole layers.
- the largest `-ngl` that fits, and the smallest `--n-cpu-moe` that fits with every layer offloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.evaluate import Prediction
from planner.cost.llamacpp import LlamaPlacement, LlamaScenario, evaluate_llamacpp
from planner.plan.llamacpp_flags import EXPERT_KINDS

FIT_TARGET_BYTES = 1024 * 2**20  # --fit's default free-memory target per device (-fitt 1024)


@dataclass(frozen=True)
class LlamaBaseline:
    name: str
    placement: LlamaPlacement | None
    prediction: Prediction | None
    note: str  # the choice in llama.cpp's own terms


def layers_placement(scn: LlamaScenario, ngl: int, n_cpu_moe: int = 0) -> LlamaPlacement:
    n = scn.spec.layers
    first = n - min(ngl, n)
    gpu = frozenset(t.name for t in scn.tensors
                    if ((t.kind == "output" and ngl > n) or (t.layer is not None and t.layer >= first))
                    and not (t.kind in EXPERT_KINDS and t.layer < n_cpu_moe))
    return LlamaPlacement(gpu, tuple(i >= first for i in range(n)))


def _score(scn: LlamaScenario, lp: LlamaPlacement, margin_bytes: int = 0) -> Prediction | None:
    pred = evaluate_llamacpp(scn, lp)
    margin_bytes = margin_bytes if scn.has_gpu else 0  # no GPU: nothing to keep free there
    fits = pred.vram.used_bytes + margin_bytes <= pred.vram.capacity_bytes and pred.host.fits
    return pred if fits else None


def _is_moe(scn: LlamaScenario) -> bool:
    return any(t.kind in EXPERT_KINDS for t in scn.tensors)


def largest_ngl(scn: LlamaScenario, margin_bytes: int = 0, n_cpu_moe: int = 0, name: str = "largest -ngl",
                moe_flag: bool = False) -> LlamaBaseline:
    n = scn.spec.layers
    top = n + 1 if scn.has_gpu else 0
    for ngl in range(top, -1, -1):
        lp = layers_placement(scn, ngl, n_cpu_moe)
        pred = _score(scn, lp, margin_bytes)
        if pred:
            moe = f" --n-cpu-moe {n_cpu_moe}" if moe_flag else ""
            return LlamaBaseline(name, lp, pred, f"-ngl {ngl}{moe}")
    return LlamaBaseline(name, None, None, "does not fit even with -ngl 0")


def smallest_n_cpu_moe(scn: LlamaScenario, margin_bytes: int = 0, name: str = "smallest --n-cpu-moe") -> LlamaBaseline:
    n = scn.spec.layers
    if not _is_moe(scn) or not scn.has_gpu:
        return LlamaBaseline(name, None, None, "not a mixture-of-experts model" if scn.has_gpu else "no GPU")
    for k in range(n + 1):
        lp = layers_placement(scn, n + 1, k)
        pred = _score(scn, lp, margin_bytes)
        if pred:
            return LlamaBaseline(name, lp, pred, f"-ngl {n + 1} --n-cpu-moe {k}")
    return LlamaBaseline(name, None, None, "does not fit even with every expert in host memory")


def fit_choice(scn: LlamaScenario) -> LlamaBaseline:
    """llama.cpp --fit: memory only, with its free-memory target."""
    if _is_moe(scn) and scn.has_gpu:
        moe = smallest_n_cpu_moe(scn, FIT_TARGET_BYTES, "--fit")
        if moe.placement is not None:
            return moe
        return largest_ngl(scn, FIT_TARGET_BYTES, scn.spec.layers, "--fit", moe_flag=True)
    return largest_ngl(scn, FIT_TARGET_BYTES, name="--fit")


def llamacpp_baselines(scn: LlamaScenario) -> list[LlamaBaseline]:
    out = [fit_choice(scn), largest_ngl(scn)]
    if _is_moe(scn):
        out.append(smallest_n_cpu_moe(scn))
    return out
