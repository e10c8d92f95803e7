"""Score a llama.cpp configuration given as flags: `offplan predict MODEL --llamacpp "…"`.

The flags become a LlamaPlacement and LlamaCppSettings (planner/plan/llamacpp_flags.py) and
are scored by evaluate_llamacpp, so a prediction from flags equals `evaluate` on the same
placement. Speeds have llama-bench's meaning: prompt processing of `prompt` tokens from an
empty cache (pp), then generation of `gen` tokens after it (tg).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cost.evaluate import Prediction
from planner.cost.llamacpp import LlamaCppSettings, LlamaPlacement, LlamaScenario, evaluate_llamacpp
from planner.hardware.profile import HardwareProfile
from planner.model.spec import ModelSpec, Workload
from planner.plan.llamacpp_flags import parse_llamacpp_flags


@dataclass(frozen=True)
class LlamaForecast:
    scenario: LlamaScenario
    placement: LlamaPlacement
    prediction: Prediction
    ngl: int
    notes: tuple[str, ...]

    @property
    def prefill_tok_s(self) -> float:
        wl = self.scenario.workload
        return wl.batch * wl.prompt / self.prediction.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.prediction.decode_tokens_per_s

    @property
    def fits(self) -> bool:
        return self.prediction.fits

    @property
    def bound_by(self) -> str:
        return self.prediction.bound("decode")

    def as_json(self) -> dict:
        pr, scn = self.prediction, self.scenario
        return {"model": scn.spec.name, "profile": scn.profile.name,
                "prompt": scn.workload.prompt, "gen": scn.workload.gen, "batch": scn.workload.batch,
                "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s, "fits": self.fits,
                "accelerator_bytes": pr.vram.used_bytes, "accelerator_capacity_bytes": pr.vram.capacity_bytes,
                "host_bytes": pr.host.used_bytes, "host_capacity_bytes": pr.host.capacity_bytes,
                "bound_by": self.bound_by, "prefill_bound_by": pr.bound("prefill"), "ngl": self.ngl,
                "gpu_tensors": len(self.placement.gpu), "kv_layers_on_gpu": sum(self.placement.kv_gpu),
                "ctx": scn.ctx_tokens, "ubatch": scn.settings.micro_batch, "notes": list(self.notes)}


def predict_llamacpp(spec: ModelSpec, profile: HardwareProfile, workload: Workload, flags: str,
                     types: dict[str, str] | None = None,
                     settings: LlamaCppSettings = LlamaCppSettings()) -> LlamaForecast:
    scn = LlamaScenario(spec, profile, workload, settings, dict(types or {}))
    parsed = parse_llamacpp_flags(flags, scn)
    scn = replace(scn, settings=parsed.settings)
    return LlamaForecast(scn, parsed.placement, evaluate_llamacpp(scn, parsed.placement), parsed.ngl, parsed.notes)
