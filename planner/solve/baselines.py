"""The placements other tools would pick (DESIGN §5), scored by the same cost model.

- `accelerate`: HF `device_map="auto"` fills VRAM greedily, layer by layer from the start,
  and streams the remaining layers (its cpu offload hooks copy weights in on use); the KV
  cache stays on the accelerator.
- `llamacpp`: the largest `-ngl` that fits (llama.cpp offloads the *last* N layers, and the
  output layer only when all repeating layers are offloaded); the other layers run on the
  CPU with their KV cache in host memory; token embeddings stay on the CPU; CPU weights are
  copied to the accelerator for prompt processing, as llama.cpp does for large batches.
- `stream-all`: every weight streamed (FlexGen / ZeRO-Inference style at batch 1); the KV
  cache on the accelerator, moved to the host in the smallest uniform share that fits.
- `experts-cpu` (mixture-of-experts models only): the usual recipe, `-ot exps=CPU` /
  `--cpu-moe`: every routed expert in host memory and computed there (copied to the
  accelerator for prompt processing, as llama.cpp does for large batches), the rest on the
  accelerator, the KV cache too (moved to the host in the smallest uniform share that fits).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost.attention import KV_LEVELS
from planner.cost.options import Scenario
from planner.model.placement import Placement
from planner.cost.evaluate import OptionTables, Prediction, evaluate, option_tables

BASELINES = ("accelerate", "llamacpp", "stream-all")


@dataclass(frozen=True)
class BaselineResult:
    name: str
    placement: Placement | None  # None when nothing this tool would pick fits
    prediction: Prediction | None
    note: str  # what the tool's choice was, in its own terms ("-ngl 41")


def _placement(scn: Scenario, layer_device: dict[int, str], head: str, embed: str, kv: list[float],
               prefill_stream_cpu: bool = False) -> Placement:
    devices, streamed = {}, []
    for t in scn.spec.tensors():
        if t.group == "embed":
            device = embed
        elif t.group == "head":
            device = head
        else:
            device = layer_device[t.layer]
        devices[t.name] = device
        if device == "cpu" and prefill_stream_cpu and t.group != "embed":
            streamed.append(t.name)
    return Placement(devices, tuple(kv), tuple(streamed))


def _fits(scn: Scenario, placement: Placement, tables: OptionTables) -> Prediction | None:
    prediction = evaluate(scn, placement, tables)
    return prediction if prediction.fits else None


def accelerate(scn: Scenario, tables: OptionTables) -> BaselineResult:
    spec = scn.spec
    # Walk the execution order (embed, layers, lm_head) and keep whole modules on the GPU
    # while they fit next to a full KV cache; the first one that does not fit and all after
    # it are offloaded (streamed on use).
    for n_gpu in range(spec.layers + 2, -1, -1):
        units = ["embed", *range(spec.layers), "head"]
        on_gpu = set(units[:n_gpu])
        layer_device = {i: "gpu" if i in on_gpu else "stream" for i in range(spec.layers)}
        placement = _placement(scn, layer_device, "gpu" if "head" in on_gpu else "stream",
                               "gpu" if "embed" in on_gpu else "cpu", [0.0] * spec.layers)
        prediction = _fits(scn, placement, tables)
        if prediction:
            n_layers = len(on_gpu & set(range(spec.layers)))
            return BaselineResult("accelerate", placement, prediction,
                                  f"{n_layers} of {spec.layers} layers on the GPU")
    return BaselineResult("accelerate", None, None, "the KV cache alone does not fit on the GPU")


def llamacpp(scn: Scenario, tables: OptionTables) -> BaselineResult:
    spec = scn.spec
    for ngl in range(spec.layers + 1, -1, -1):
        first_gpu = spec.layers - min(ngl, spec.layers)
        layer_device = {i: "gpu" if i >= first_gpu else "cpu" for i in range(spec.layers)}
        kv = [0.0 if i >= first_gpu else 1.0 for i in range(spec.layers)]
        placement = _placement(scn, layer_device, "gpu" if ngl > spec.layers else "cpu", "cpu", kv,
                               prefill_stream_cpu=True)
        prediction = _fits(scn, placement, tables)
        if prediction:
            return BaselineResult("llamacpp", placement, prediction, f"-ngl {ngl}")
    return BaselineResult("llamacpp", None, None, "does not fit even with -ngl 0")


def stream_all(scn: Scenario, tables: OptionTables) -> BaselineResult:
    spec = scn.spec
    for c in KV_LEVELS:
        placement = _placement(scn, {i: "stream" for i in range(spec.layers)}, "stream", "cpu", [c] * spec.layers)
        prediction = _fits(scn, placement, tables)
        if prediction:
            return BaselineResult("stream-all", placement, prediction, f"KV {c:.0%} on the host")
    return BaselineResult("stream-all", None, None, "streaming buffers and workspace do not fit")


def experts_cpu(scn: Scenario, tables: OptionTables) -> BaselineResult:
    spec = scn.spec
    devices = {t.name: "cpu" if t.experts or t.group == "embed" else "gpu" for t in spec.tensors()}
    banks = tuple(t.name for t in spec.tensors() if t.experts)  # copied up for prompts, as llama.cpp does
    for c in KV_LEVELS:
        placement = Placement(devices, (c,) * spec.layers, banks)
        prediction = _fits(scn, placement, tables)
        if prediction:
            return BaselineResult("experts-cpu", placement, prediction, f"experts on the CPU, KV {c:.0%} on the host")
    return BaselineResult("experts-cpu", None, None, "the weights without their experts do not fit on the GPU")


def run_baselines(scn: Scenario, tables: OptionTables | None = None) -> list[BaselineResult]:
    tables = tables or option_tables(scn)
    results = [accelerate(scn, tables), llamacpp(scn, tables), stream_all(scn, tables)]
    if scn.spec.moe is not None:
        results.append(experts_cpu(scn, tables))
    return results
