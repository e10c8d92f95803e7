"""Run a plan for real and compare what was measured with what the planner predicted.

Greedy generation of `batch` random prompts: time to first token (prefill + first argmax),
decode tokens/s, peak memory per device, achieved link bandwidth, and (with per-layer
profiling) each stage's time beside its predicted time.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from planner.errors import PlanError
from planner.plan.record import Plan, PredictedSummary, summarize
from planner.cost.evaluate import evaluate
from planner.cost.roofline import h2d_s
from planner.model.spec import Workload

from .devmem import check_memory, peak_bytes, planned_link_host_bytes, planned_peak_bytes, reset_peak
from .model import EXECUTOR_FAMILIES, Transformer
from .offload import OffloadHandle, apply_plan
from .streams import Devices
from .weights import check_checkpoint, load_checkpoint, synthetic_model

Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunOptions:
    checkpoint: Path | None = None  # HF safetensors directory; None with synthetic=True
    synthetic: bool = False
    seed: int = 0
    prompt: int | None = None  # override the plan's workload
    gen: int | None = None
    threads: int | None = None  # torch CPU threads; None = torch's default
    profile_layers: bool = False
    warmup_steps: int = 3
    trace: bool = False  # record measured events for `--trace`
    draft_checkpoint: Path | None = None  # the plan's draft model; synthetic with `synthetic`


@dataclass(frozen=True)
class StageMeasure:
    name: str
    measured_s: float  # mean decode time of the stage, wall clock
    predicted_s: float
    cpu_s: float  # of which: cpu-computed linears (compute + transfers)
    host_attention_s: float  # host part of hybrid attention (overlapped with device part)


@dataclass(frozen=True)
class Measured:
    ttft_s: float
    decode_step_s: float
    decode_tokens_per_s: float
    accelerator_peak_bytes: int  # CUDA: peak reserved + held outside the allocator; loopback: accounted tensors
    accelerator_peak_is_accounted: bool
    host_peak_rss_bytes: int
    streamed_bytes_per_step: float
    link_busy_s_per_step: float
    link_gbps: float  # achieved while copying (0 when nothing streams)
    copy_wait_s_per_step: float  # compute time lost waiting for streamed weights
    cpu_linear_s_per_step: float
    tokens: tuple[tuple[int, ...], ...]  # generated tokens per sequence
    stages: tuple[StageMeasure, ...] = ()
    events: tuple = ()  # planner.simulate.trace.Event tuples when tracing
    acceptance: float | None = None  # speculative decoding: measured per-token acceptance
    tokens_per_step: float | None = None  # measured E
    host_page_locked_bytes: int = 0  # streamed-weight pool + activation staging (page-locked on CUDA)


@dataclass(frozen=True)
class RunReport:
    plan: Plan
    workload: Workload
    predicted: PredictedSummary
    measured: Measured
    device: str
    repredicted: PredictedSummary | None = None  # with the measured acceptance rate

    def comparisons(self) -> list[tuple[str, float, float, str]]:
        """(metric, predicted, measured, unit) rows of the measured-vs-predicted table."""
        p, m = self.predicted, self.measured
        rows = [("time to first token", p.ttft_s, m.ttft_s, "s"),
                ("decode step", p.decode_step_s, m.decode_step_s, "s"),
                ("decode tokens/s", p.decode_tokens_per_s, m.decode_tokens_per_s, "tok/s"),
                ("accelerator memory", float(planned_peak_bytes(p.vram, not m.accelerator_peak_is_accounted)),
                 float(m.accelerator_peak_bytes), "bytes")]
        if m.host_page_locked_bytes:
            rows.append(("host memory for the link", float(planned_link_host_bytes(self.plan, p.host)),
                         float(m.host_page_locked_bytes), "bytes"))
        streamed_bytes, copy_s = _planned_streaming(self.plan)
        if streamed_bytes > 0 and m.acceptance is None:
            rows.append(("weights streamed per step", float(streamed_bytes), m.streamed_bytes_per_step, "bytes"))
            rows.append(("link busy per step", copy_s, m.link_busy_s_per_step, "s"))
        if m.acceptance is not None and self.plan.draft is not None:
            rows.append(("draft acceptance (assumed)", self.plan.draft.acceptance, m.acceptance, ""))
            rows.append(("tokens per verify step (E)", p.expected_tokens, m.tokens_per_step, "tok"))
            if self.repredicted is not None:
                rows.append(("decode tokens/s at measured acceptance", self.repredicted.decode_tokens_per_s,
                             m.decode_tokens_per_s, "tok/s"))
        return rows


def _planned_streaming(plan: Plan) -> tuple[int, float]:
    """(bytes, seconds of copies) the plan streams per decode step: the weights placed on
    `stream` (activations crossing the link are not counted: the engine's counters do not)."""
    streamed = [t.n_bytes for t in plan.model.tensors() if plan.placement.device(t.name) == "stream"]
    return sum(streamed), sum(h2d_s(plan.profile, n) for n in streamed)


def _planned_vram(p: PredictedSummary) -> int:
    return planned_peak_bytes(p.vram, cuda=False)


def check_runnable(plan: Plan, devices: Devices) -> None:
    """Refuse a plan this executor cannot run, or made for hardware this machine does not have
    (DESIGN §7), before anything is loaded."""
    if plan.model.family not in EXECUTOR_FAMILIES:
        raise PlanError(f"the executor does not run {plan.model.family} models yet (runs: "
                        f"{', '.join(EXECUTOR_FAMILIES)}); plan, simulate and export them, or run the "
                        "exported flags with llama.cpp")
    loopback = plan.profile.accelerator.loopback
    if loopback and devices.cuda:
        raise PlanError(f"the plan was made for the loopback profile {plan.profile.name!r} but this machine has "
                        f"CUDA device {torch.cuda.get_device_name()}: run `offplan profile` and solve again")
    if not loopback and not devices.cuda:
        raise PlanError(f"the plan was made for {plan.profile.accelerator.name} but this machine has no CUDA "
                        "device: run `offplan profile` here (it writes a loopback profile) and solve with "
                        "--hw <that file>")
    if plan.draft is not None and plan.draft.spec.vocab != plan.model.vocab:
        raise PlanError(f"draft {plan.draft.name!r}: vocabulary {plan.draft.spec.vocab} differs from the target's "
                        f"{plan.model.vocab}")
    if plan.model.moe is not None and (plan.model.quantization is not None or plan.model.weight_bits):
        raise PlanError("the executor runs mixture-of-experts models with unquantized weights only; this plan "
                        "is for quantized ones: export it to llama.cpp, or plan the bf16 model")
    if plan.model.quantization is not None and plan.model.quantization.bits not in (4, 8):
        raise PlanError(f"quantization.bits: the executor runs 4- and 8-bit weights, the plan has "
                        f"{plan.model.quantization.bits}")


def build_model(plan: Plan, options: RunOptions, progress: Progress) -> Transformer:
    if options.checkpoint is not None:
        check_checkpoint(options.checkpoint, plan.model)  # before any weight is read
        progress(f"loading checkpoint {options.checkpoint}")
        _, model = load_checkpoint(options.checkpoint, dtype=plan.model.dtype)
        return model
    if not options.synthetic:
        raise PlanError("give --checkpoint DIR (a Hugging Face safetensors directory) or --synthetic")
    progress(f"building synthetic weights for {plan.model.name} (seed {options.seed})")
    return synthetic_model(plan.model, seed=options.seed)


def _sync(devices: Devices) -> None:
    if devices.cuda:
        torch.cuda.synchronize()


def run_plan(plan: Plan, options: RunOptions, progress: Progress = lambda _: None,
             devices: Devices | None = None) -> RunReport:
    devices = devices or Devices.detect()
    check_runnable(plan, devices)
    workload = replace(plan.workload, prompt=options.prompt or plan.workload.prompt,
                       gen=options.gen or plan.workload.gen)
    if workload != plan.workload:
        plan = replace(plan, workload=workload)
    predicted = summarize(plan.evaluate())
    check_memory(predicted.vram, predicted.host, devices)  # before any weight is loaded
    if options.threads:
        torch.set_num_threads(options.threads)
    model = build_model(plan, options, progress)
    extra = plan.draft.gamma + 1 if plan.draft else 0
    compensation = None
    if plan.model.quantization is not None:
        from .compensate_model import compensate_model
        progress("quantizing weights and building compensation branches")
        compensation = compensate_model(model, plan)
    handle = apply_plan(model, plan, devices, max_tokens=workload.context + extra, timed=options.profile_layers)
    if compensation is not None:
        handle.on_close.append(compensation.close)
    try:
        if plan.draft is None:
            return RunReport(plan, workload, predicted, _measure(handle, workload, options, progress),
                             str(devices.accelerator))
        draft = build_draft(plan, options, progress).to(devices.accelerator)
        measured = _measure_speculative(handle, draft, workload, options, progress)
    finally:
        handle.close()
    repredicted = summarize(evaluate(replace(plan.scenario(), acceptance=min(measured.acceptance, 1.0)),
                                     plan.placement))
    return RunReport(plan, workload, predicted, measured, str(devices.accelerator), repredicted)


def build_draft(plan: Plan, options: RunOptions, progress: Progress) -> Transformer:
    """The plan's draft: a checkpoint, or (synthetic runs) random weights of its shape, which
    agree with a random target rarely: expect a low measured acceptance."""
    spec = plan.draft.spec
    if options.draft_checkpoint is not None:
        check_checkpoint(options.draft_checkpoint, spec)
        progress(f"loading draft checkpoint {options.draft_checkpoint}")
        return load_checkpoint(options.draft_checkpoint, dtype=spec.dtype)[1]
    if not options.synthetic:
        raise PlanError(f"the plan uses draft {plan.draft.name!r}: give --draft-checkpoint DIR")
    progress(f"building synthetic weights for draft {spec.name}")
    return synthetic_model(spec, seed=options.seed + 1)


def _measure_speculative(handle: OffloadHandle, draft: Transformer, wl: Workload, options: RunOptions,
                         progress: Progress) -> Measured:
    """Draft/verify generation; prefill ends when the first verify step begins."""
    from .speculative import speculative_generate
    model, devices, gamma = handle.model, handle.devices, handle.plan.draft.gamma
    generator = torch.Generator().manual_seed(options.seed)
    prompt = torch.randint(0, model.spec.vocab, (wl.batch, wl.prompt), generator=generator).to(devices.accelerator)
    progress("warming up")
    speculative_generate(model, draft, prompt, min(wl.gen, gamma + 2), gamma, target_begin=handle.begin)
    handle.engine.reset_counters()
    reset_peak(devices)
    marks: dict[str, float] = {}

    def begin(phase: str) -> None:
        if phase == "decode" and "decode" not in marks:
            _sync(devices)
            marks["decode"] = time.perf_counter()
        handle.begin(phase)

    progress(f"prefill of {wl.batch}x{wl.prompt} tokens, then draft/verify steps (gamma {gamma})")
    _sync(devices)
    start = time.perf_counter()
    out = speculative_generate(model, draft, prompt, wl.gen, gamma, target_begin=begin)
    _sync(devices)
    end = time.perf_counter()
    first_decode = marks.get("decode", end)
    decode_s = end - first_decode
    steps = max(out.steps, 1)
    peak = peak_bytes(devices, handle.accelerator_bytes + sum(p.numel() * p.element_size() for p in draft.parameters()))
    return Measured(
        ttft_s=first_decode - start, decode_step_s=decode_s / steps,
        decode_tokens_per_s=wl.batch * (wl.gen - 1) / decode_s if decode_s > 0 else 0.0,
        accelerator_peak_bytes=int(peak), accelerator_peak_is_accounted=not devices.cuda,
        host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        streamed_bytes_per_step=handle.engine.bytes_copied / steps,
        link_busy_s_per_step=handle.engine.copy_busy_s / steps,
        link_gbps=handle.engine.bytes_copied / handle.engine.copy_busy_s / 1e9 if handle.engine.copy_busy_s else 0.0,
        copy_wait_s_per_step=handle.engine.wait_s / steps, cpu_linear_s_per_step=0.0,
        tokens=tuple(tuple(int(t) for t in row) for row in out.tokens.tolist()),
        acceptance=out.acceptance_rate, tokens_per_step=out.tokens_per_step,
        host_page_locked_bytes=handle.page_locked_bytes)


def _measure(handle: OffloadHandle, wl: Workload, options: RunOptions, progress: Progress) -> Measured:
    model, devices, engine = handle.model, handle.devices, handle.engine
    generator = torch.Generator().manual_seed(options.seed)
    prompt = torch.randint(0, model.spec.vocab, (wl.batch, wl.prompt), generator=generator).to(devices.accelerator)
    timer = _StageTimer(handle) if options.profile_layers else None

    progress("warming up")
    # A full-length prefill first, so the measured one does not pay first-touch page faults
    # and allocator growth, which the cost model does not describe.
    _generate(handle, prompt, min(options.warmup_steps, wl.gen), None)
    handle.reset_caches()
    engine.reset_counters()
    handle.linear_stats.cpu_s = handle.linear_stats.xfer_s = 0.0
    reset_peak(devices)

    recorder = _start_trace(handle) if options.trace else None
    progress(f"prefill of {wl.batch}x{wl.prompt} tokens, then {wl.gen - 1} decode steps")
    ttft_s, step_times, tokens, decode_counters = _generate(handle, prompt, wl.gen, timer)
    hooks = recorder.hooks if recorder else []
    for hook in hooks:
        hook.remove()
    steps = max(len(step_times), 1)
    decode_s = sum(step_times)
    copied_bytes, busy_s, wait_s, cpu_s = decode_counters
    peak = peak_bytes(devices, handle.accelerator_bytes)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return Measured(
        ttft_s=ttft_s, decode_step_s=decode_s / steps,
        decode_tokens_per_s=wl.batch * len(step_times) / decode_s if decode_s else 0.0,
        accelerator_peak_bytes=int(peak), accelerator_peak_is_accounted=not devices.cuda, host_peak_rss_bytes=int(rss),
        streamed_bytes_per_step=copied_bytes / steps, link_busy_s_per_step=busy_s / steps,
        link_gbps=copied_bytes / busy_s / 1e9 if busy_s > 0 else 0.0,
        copy_wait_s_per_step=wait_s / steps, cpu_linear_s_per_step=cpu_s / steps,
        tokens=tuple(tuple(int(t) for t in row) for row in tokens.tolist()),
        stages=timer.summary(handle.plan, steps) if timer else (),
        events=tuple(recorder.finish()) if recorder else (), host_page_locked_bytes=handle.page_locked_bytes)


def _start_trace(handle: OffloadHandle):
    """Record accelerator intervals per stage (forward hooks), copies and cpu matmuls."""
    from .recorder import Recorder
    recorder = Recorder(handle.devices.accelerator if handle.devices.cuda else None)
    handle.record(recorder)
    modules = [(f"layer {i}", m) for i, m in enumerate(handle.model.model.layers)] + [("head", handle.model.lm_head)]
    starts: dict[str, object] = {}

    def pre(stage):  # stamps, not synchronisations: the trace does not change the overlap it shows
        def hook(module, args):
            starts[stage] = recorder.stamp()
        return hook

    def post(stage):
        def hook(module, args, output):
            recorder.add_stamped("accelerator", stage, starts[stage], recorder.stamp(), stage)
        return hook
    recorder.hooks = []
    for stage, module in modules:
        recorder.hooks.append(module.register_forward_pre_hook(pre(stage)))
        recorder.hooks.append(module.register_forward_hook(post(stage)))
    return recorder


def _generate(handle: OffloadHandle, prompt: torch.Tensor, gen: int, timer: "_StageTimer | None"):
    """Greedy generation; returns (ttft_s, decode step times, tokens [batch, gen], decode counters)."""
    model, devices, engine = handle.model, handle.devices, handle.engine
    _sync(devices)
    start = time.perf_counter()
    handle.begin("prefill")
    logits = model(prompt, last_only=True)  # [batch, 1, vocab]: as planned, lm_head on the last position
    token = logits[:, -1].argmax(-1, keepdim=True)  # [batch, 1]
    _sync(devices)
    ttft_s = time.perf_counter() - start
    out = [token]
    engine.reset_counters()
    cpu_before = handle.linear_stats.cpu_s + handle.linear_stats.xfer_s
    handle.begin("decode")
    if timer:
        timer.start()
    step_times = []
    for _ in range(gen - 1):
        step_start = time.perf_counter()
        handle.begin("decode")
        logits = model(token)  # [batch, 1, vocab]
        token = logits[:, -1].argmax(-1, keepdim=True)
        _sync(devices)
        step_times.append(time.perf_counter() - step_start)
        out.append(token)
    if timer:
        timer.stop()
    counters = (engine.bytes_copied, engine.copy_busy_s, engine.wait_s,
                handle.linear_stats.cpu_s + handle.linear_stats.xfer_s - cpu_before)
    return ttft_s, step_times, torch.cat(out, dim=1).cpu(), counters


class _StageTimer:
    """Forward hooks timing each decoder layer (and the head) during decode."""

    def __init__(self, handle: OffloadHandle):
        self.handle = handle
        self.model = handle.model
        self.totals: dict[int, float] = {}
        self.hooks: list = []
        self._begin: dict[int, float] = {}
        self._host_attn_before: list[float] = []

    def _pre(self, index: int):
        def hook(module, args):
            _sync(self.handle.devices)
            self._begin[index] = time.perf_counter()
        return hook

    def _post(self, index: int):
        def hook(module, args, output):
            _sync(self.handle.devices)
            self.totals[index] = self.totals.get(index, 0.0) + time.perf_counter() - self._begin[index]
        return hook

    def start(self) -> None:
        modules = list(self.model.model.layers) + [self.model.lm_head]
        for i, module in enumerate(modules):
            self.hooks.append(module.register_forward_pre_hook(self._pre(i)))
            self.hooks.append(module.register_forward_hook(self._post(i)))
        self._host_attn_before = [getattr(c, "host_s", 0.0) for c in self.handle.caches]

    def stop(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def summary(self, plan: Plan, steps: int) -> tuple[StageMeasure, ...]:
        predicted = summarize(plan.evaluate()).stages
        host_attn = [getattr(c, "host_s", 0.0) - b for c, b in zip(self.handle.caches, self._host_attn_before)]
        rows = []
        for i, stage in enumerate(predicted):
            attn = host_attn[i] / steps if i < len(host_attn) else 0.0
            rows.append(StageMeasure(stage.name, self.totals.get(i, 0.0) / steps, stage.decode_s, 0.0, attn))
        return tuple(rows)

