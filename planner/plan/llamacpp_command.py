"""A llama.cpp placement as the command line that produces it.

`-ngl` is chosen from the KV caches on the GPU (they must be the last layers); the weights
that differ from what `-ngl` alone would do become `-ot` overrides, merged into a few
regexes over the GGUF names (one per set of layers, listing the matrix kinds), or
`--n-cpu-moe N` when the difference is exactly the experts of the first N layers. Patterns
are anchored, so `^output\\.weight` does not also match `blk.N.attn_output.weight`; a matrix's
bias (qwen2's attn_q.bias, gpt-oss's expert biases) goes where its matrix goes.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from planner.cost.llamacpp import LlamaCppSettings, LlamaPlacement, LlamaScenario
from planner.plan.llamacpp_flags import EXPERT_KINDS


@dataclass(frozen=True)
class LlamaCommand:
    args: tuple[str, ...]  # everything after the program name
    ngl: int
    nkvo: bool
    n_cpu_moe: int | None
    overrides: tuple[str, ...]  # PATTERN=BUFFER
    ollama_num_gpu: int | None  # when the plan is whole layers

    def line(self, program: str = "llama-server") -> str:
        return " ".join([program, *(shlex.quote(a) for a in self.args)])


def _default_gpu(scn: LlamaScenario, ngl: int) -> set[str]:
    n = scn.spec.layers
    first = n - min(ngl, n)
    return {t.name for t in scn.tensors
            if (t.kind == "output" and ngl > n) or (t.layer is not None and t.layer >= first)}


def _layers_regex(layers: list[int], n_layers: int) -> str:
    """Decimal alternatives matching exactly `layers`: [0-9], 3[4-9], [1-3][0-9] ..."""
    if layers == list(range(n_layers)):
        return r"\d+"
    by_prefix: dict[str, set[int]] = {}
    for layer in layers:
        text = str(layer)
        by_prefix.setdefault(text[:-1], set()).add(int(text[-1]))
    # prefixes (same length) whose last digits are the same set are merged into one class
    by_digits: dict[tuple[int, frozenset[int]], list[str]] = {}
    for prefix, digits in by_prefix.items():
        by_digits.setdefault((len(prefix), frozenset(digits)), []).append(prefix)
    parts = []
    for (length, digits), prefixes in sorted(by_digits.items(), key=lambda kv: min(int(p or 0) for p in kv[1])):
        last = _digit_class(sorted(digits))
        if length == 1:
            parts.append(_digit_class(sorted(int(p) for p in prefixes)) + last)
        else:
            parts += [p + last for p in sorted(prefixes)]
    return parts[0] if len(parts) == 1 else "(" + "|".join(parts) + ")"


def _digit_class(digits: list[int]) -> str:
    if not digits:
        return ""
    runs, start = [], digits[0]
    for a, b in zip(digits, digits[1:] + [None]):
        if b != a + 1:
            runs.append(str(start) if start == a else f"{start}-{a}" if a > start + 1 else f"{start}{a}")
            start = b
    text = "".join(runs)
    return text if len(digits) == 1 else f"[{text}]"


def merge_patterns(scn: LlamaScenario, names: set[str]) -> list[str]:
    """Few anchored regexes matching exactly the GGUF tensors `names`."""
    by_kind: dict[str, list[int]] = {}
    patterns = []
    for t in scn.tensors:
        if t.name not in names:
            continue
        if t.layer is None:
            patterns.append("^" + re.escape(t.name) + "$")
        else:
            by_kind.setdefault(t.kind, []).append(t.layer)
    by_layers: dict[tuple[int, ...], list[str]] = {}
    for kind, layers in by_kind.items():
        by_layers.setdefault(tuple(sorted(layers)), []).append(kind)
    for layers, kinds in sorted(by_layers.items()):
        kind_re = kinds[0] if len(kinds) == 1 else "(" + "|".join(sorted(kinds)) + ")"
        patterns.append(rf"^blk\.{_layers_regex(list(layers), scn.spec.layers)}\.{kind_re}\.(weight|bias)$")
    return patterns


def _n_cpu_moe(scn: LlamaScenario, to_cpu: set[str], default_gpu: set[str]) -> int | None:
    """N when moving `to_cpu` off the GPU is what `--n-cpu-moe N` does: the expert tensors of
    layers 0..N-1 (those of layers -ngl leaves in host memory already are)."""
    experts = [t for t in scn.tensors if t.kind in EXPERT_KINDS]
    if not to_cpu or not experts or any(t.kind not in EXPERT_KINDS for t in scn.tensors if t.name in to_cpu):
        return None
    n = max(t.layer for t in experts if t.name in to_cpu) + 1
    wanted = {t.name for t in experts if t.layer < n and t.name in default_gpu}
    return n if wanted == to_cpu else None


def llamacpp_command(scn: LlamaScenario, lp: LlamaPlacement, model_path: str = "model.gguf",
                     settings: LlamaCppSettings | None = None) -> LlamaCommand:
    settings = settings or scn.settings
    n = scn.spec.layers
    n_kv = sum(lp.kv_gpu)
    movable = {t.name for t in scn.tensors if t.kind != "token_embd"}
    if lp.nkvo:  # every cache in host memory with attention on the CPU: -nkvo and any -ngl
        candidates = [(n + 1, True), (0, True)]
    elif n_kv:
        candidates = [(n_kv + (1 if n_kv == n and "output.weight" in lp.gpu else 0), False)]
    else:
        candidates = [(0, False)]
    best = None
    for ngl, nkvo in candidates:
        default = _default_gpu(scn, ngl) & movable
        to_cpu, to_gpu = default - lp.gpu, lp.gpu - default
        n_moe = _n_cpu_moe(scn, to_cpu, default) if not to_gpu else None
        overrides = [] if n_moe else [p + "=CPU" for p in merge_patterns(scn, to_cpu)]
        overrides += [p + "=CUDA0" for p in merge_patterns(scn, to_gpu)]
        if best is None or len(overrides) < len(best[3]):
            best = (ngl, nkvo, n_moe, overrides)
    ngl, nkvo, n_moe, overrides = best
    args = ["-m", model_path, "-ngl", str(ngl)]
    if nkvo:
        args.append("-nkvo")
    if n_moe:
        args += ["--n-cpu-moe", str(n_moe)]
    for o in overrides:
        args += ["-ot", o]
    args += ["-c", str(settings.ctx or scn.workload.context)]
    if settings.ubatch != LlamaCppSettings().ubatch:
        args += ["-ub", str(settings.ubatch)]
    if not settings.flash_attn:
        args += ["-fa", "off"]
    whole_layers = not nkvo and not n_moe and not overrides
    return LlamaCommand(tuple(args), ngl, nkvo, n_moe, tuple(overrides), ngl if whole_layers else None)


def ollama_lines(cmd: LlamaCommand, ctx: int) -> list[str]:
    """Modelfile lines for Ollama, when the plan is whole layers."""
    if cmd.ollama_num_gpu is None:
        return []
    return [f"PARAMETER num_gpu {cmd.ollama_num_gpu}", f"PARAMETER num_ctx {ctx}"]
