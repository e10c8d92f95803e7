"""llama.cpp command lines, both ways: a placement -> `-ngl` / `-ot` / `--n-cpu-moe` / `-nkvo`
(plus an Ollama `PARAMETER num_gpu` line when the plan is whole layers), and the flags a user
runs with -> the placement and settings they mean.

Semantics follow llama.cpp (src/llama-model.cpp, common/arg.cpp): `-ngl N` offloads the last
N repeating layers (weights, KV cache, attention) and, above the layer count, the output
matrix; `-ot PATTERN=BUFFER` overrides where matching weights live, the first matching
pattern winning (std::regex_search on the GGUF tensor name); `--n-cpu-moe N` keeps the
experts of the first N layers in host memory; `-nkvo` keeps every KV cache in host memory.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace

from planner.cost.llamacpp import KV_TYPE_BITS, LlamaCppSettings, LlamaPlacement, LlamaScenario
from planner.errors import OffplanError

GPU_BUFFER = re.compile(r"^(CUDA|ROCm|Vulkan|SYCL|Metal|GPU|MUSA|CANN)\d*$", re.IGNORECASE)
EXPERT_KINDS = ("ffn_up_exps", "ffn_gate_exps", "ffn_down_exps")
# Flags that do not change placement, speed or memory in the model, and how many values they take.
IGNORED = {"-m": 1, "--model": 1, "-p": 1, "-n": 1, "-r": 1, "-o": 1, "--port": 1, "--host": 1, "-s": 1,
           "--seed": 1, "--temp": 1, "-np": 1, "--parallel": 1, "--alias": 1, "-a": 1, "--numa": 1, "-sm": 1,
           "--split-mode": 1, "-mg": 1, "--main-gpu": 1, "-pg": 1, "-d": 1, "-C": 1, "--prio": 1, "--poll": 1,
           "-mla": 1, "-amb": 1, "-ser": 1, "--repetitions": 1, "-hf": 1, "--hf-repo": 1, "--chat-template": 1,
           "--jinja": 0, "-v": 0, "--verbose": 0, "--no-warmup": 0, "-cb": 0, "--cont-batching": 0,
           "--metrics": 0, "-fmoe": 0, "-rtr": 0, "-i": 0, "-cnv": 0, "--mlock": 0}
IGNORED_WHY = {"-mla": "ik_llama.cpp option, not modelled", "-amb": "ik_llama.cpp option, not modelled",
               "-fmoe": "ik_llama.cpp option, not modelled", "-rtr": "ik_llama.cpp option, not modelled",
               "-p": "use --prompt", "-n": "use --gen", "-d": "use --prompt for the cache depth"}


# Flags that change placement, speed or memory (parse_llamacpp_flags reads them).
MODELLED = ("-ngl", "--n-gpu-layers", "--gpu-layers", "-ot", "--override-tensor", "--n-cpu-moe", "-ncmoe",
            "--cpu-moe", "-cmoe", "-nkvo", "--no-kv-offload", "-fa", "--flash-attn", "--no-mmap", "-mmap", "-c",
            "--ctx-size", "-ub", "--ubatch-size", "-b", "--batch-size", "-t", "--threads", "-ctk", "--cache-type-k",
            "-ctv", "--cache-type-v")


def is_known_flag(flag: str) -> bool:
    return flag in MODELLED or flag in IGNORED


@dataclass(frozen=True)
class ParsedFlags:
    placement: LlamaPlacement
    settings: LlamaCppSettings
    ngl: int
    notes: tuple[str, ...]


def _int(flag: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OffplanError(f"{flag} {value!r}: expected a whole number") from None


def _bool_value(tokens: list[str], i: int) -> tuple[bool, int]:
    """Optional on/off value after a switch (llama-bench writes `-nkvo 1`, servers `-nkvo`)."""
    if i + 1 < len(tokens) and tokens[i + 1].lower() in ("0", "1", "on", "off", "auto", "true", "false"):
        return tokens[i + 1].lower() in ("1", "on", "auto", "true"), i + 2
    return True, i + 1


def _overrides(flag: str, value: str) -> list[tuple[str, bool]]:
    out = []
    for item in value.split(","):
        pattern, sep, buffer = item.rpartition("=")
        if not sep or not pattern:
            raise OffplanError(f"{flag} {item!r}: write PATTERN=BUFFER, e.g. 'ffn_.*_exps=CPU'")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise OffplanError(f"{flag} {pattern!r}: not a valid regular expression ({exc})") from None
        if buffer.upper().startswith("CPU"):
            out.append((pattern, False))
        elif GPU_BUFFER.match(buffer):
            out.append((pattern, True))
        else:
            raise OffplanError(f"{flag} {item!r}: unknown buffer {buffer!r}; use CPU or a GPU such as CUDA0")
    return out


def parse_llamacpp_flags(text: str, scn: LlamaScenario) -> ParsedFlags:
    """The placement and settings a llama.cpp flag string means for the model of `scn`."""
    try:
        tokens = shlex.split(text)
    except ValueError as exc:
        raise OffplanError(f"--llamacpp: cannot split {text!r} ({exc})") from None
    n_layers = scn.spec.layers
    ngl, nkvo, overrides, notes, unknown = None, False, [], [], []
    settings = scn.settings
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) else None
        if flag in ("-ngl", "--n-gpu-layers", "--gpu-layers"):
            ngl = 10**6 if value in ("all", "-1") else _int(flag, _need(flag, value))
            i += 2
        elif flag in ("-ot", "--override-tensor"):
            overrides += _overrides(flag, _need(flag, value))
            i += 2
        elif flag in ("--n-cpu-moe", "-ncmoe"):
            n = _int(flag, _need(flag, value))
            overrides += [(rf"^blk\.{layer}\.ffn_(up|down|gate)_exps", False) for layer in range(n)]
            i += 2
        elif flag in ("--cpu-moe", "-cmoe"):
            overrides.append((r"\.ffn_(up|down|gate)_exps", False))
            i += 1
        elif flag in ("-nkvo", "--no-kv-offload"):
            nkvo, i = _bool_value(tokens, i)
        elif flag in ("-fa", "--flash-attn"):
            on, i = _bool_value(tokens, i)
            settings = replace(settings, flash_attn=on)
        elif flag in ("--no-mmap",):
            settings, i = replace(settings, mmap=False), i + 1
        elif flag == "-mmap":
            on, i = _bool_value(tokens, i)
            settings = replace(settings, mmap=on)
        elif flag in ("-c", "--ctx-size", "-ub", "--ubatch-size", "-b", "--batch-size", "-t", "--threads"):
            settings = _setting(settings, flag, _int(flag, _need(flag, value)))
            i += 2
        elif flag in ("-ctk", "--cache-type-k", "-ctv", "--cache-type-v"):
            settings = _cache_type(settings, flag, _need(flag, value))
            i += 2
        elif flag in IGNORED:
            notes.append(f"{flag}: ignored ({IGNORED_WHY.get(flag, 'does not change placement or speed here')})")
            i = i + 1 + (value is not None) if IGNORED[flag] else _bool_value(tokens, i)[1]
        else:
            unknown.append(flag)  # its value, if any, is not reported as a flag
            i += 2 if value is not None and not value.startswith("-") else 1
    if unknown:
        raise OffplanError(f"--llamacpp: unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                           "(known: -ngl, -ot, --n-cpu-moe, --cpu-moe, -nkvo, -c, -ub, -b, -fa, -ctk, -ctv, "
                           "-t, --no-mmap)")
    if ngl is None:
        if scn.has_gpu:
            notes.append("no -ngl: nothing offloaded (give -ngl N)")
        ngl = 0
    if not scn.has_gpu and (ngl or any(gpu for _, gpu in overrides)):
        notes.append(f"{scn.profile.name} has no GPU: -ngl and GPU overrides have no effect")
        ngl, overrides = 0, [(p, gpu) for p, gpu in overrides if not gpu]
    return ParsedFlags(_placement(scn, ngl, nkvo, overrides, notes), settings, min(ngl, n_layers + 1), tuple(notes))


def _need(flag: str, value: str | None) -> str:
    if value is None:
        raise OffplanError(f"{flag}: needs a value")
    return value


def _setting(settings: LlamaCppSettings, flag: str, value: int) -> LlamaCppSettings:
    if value <= 0 and flag not in ("-c", "--ctx-size"):
        raise OffplanError(f"{flag} {value}: must be positive")
    field = {"-c": "ctx", "--ctx-size": "ctx", "-ub": "ubatch", "--ubatch-size": "ubatch", "-b": "batch",
             "--batch-size": "batch", "-t": "threads", "--threads": "threads"}[flag]
    return replace(settings, **{field: max(value, 0)})


def _cache_type(settings: LlamaCppSettings, flag: str, value: str) -> LlamaCppSettings:
    kind = value.upper()
    if kind not in KV_TYPE_BITS:
        raise OffplanError(f"{flag} {value!r}: unknown cache type; use one of {', '.join(KV_TYPE_BITS).lower()}")
    field = "cache_type_k" if flag in ("-ctk", "--cache-type-k") else "cache_type_v"
    return replace(settings, **{field: kind})


def _placement(scn: LlamaScenario, ngl: int, nkvo: bool, overrides: list[tuple[str, bool]],
               notes: list[str]) -> LlamaPlacement:
    n_layers = scn.spec.layers
    first_gpu = n_layers - min(ngl, n_layers)
    gpu = set()
    for t in scn.tensors:
        on = t.layer is not None and t.layer >= first_gpu if t.kind != "output" else ngl > n_layers
        for pattern, to_gpu in overrides:
            if re.search(pattern, t.name):
                on = to_gpu
                break
        if t.kind == "token_embd":
            if on:
                notes.append("token_embd.weight: llama.cpp keeps token embeddings in host memory; override ignored")
            continue
        if on:
            gpu.add(t.name)
    kv = tuple(not nkvo and layer >= first_gpu for layer in range(n_layers))
    return LlamaPlacement(frozenset(gpu), kv, nkvo)
