"""How a published row (benchmarks/published/rows.yaml) becomes a prediction input: the
model's shape, its llama.cpp file type, the GPU profile, the host (cores, DRAM) and the flags.

Shapes are those of the public config.json files; CPU core and memory-channel counts are
the vendors' product pages. A row whose model, quantization or GPU offplan has no
description for is skipped with the reason.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace

from planner.hardware.host import with_host
from planner.hardware.profile import HardwareProfile, load_profile
from planner.model.presets import preset
from planner.model.spec import ModelSpec
from planner.plan.llamacpp_flags import IGNORED, is_known_flag

GIB = 2**30


def _llama(name, layers, hidden, inter, heads, kv, vocab=32000) -> ModelSpec:
    return ModelSpec(name=name, family="llama", layers=layers, hidden=hidden, intermediate=inter, heads=heads,
                     kv_heads=kv, vocab=vocab, max_context=131072)


# model regex (on model + hf_model) -> spec; the first match wins
MODELS = [
    (r"tinyllama", lambda: _llama("tinyllama-1.1b", 22, 2048, 5632, 32, 4)),
    (r"llama.?3(\.1)?.?8b|llama 8b", lambda: preset("llama-3.1-8b")),
    (r"llama 70b|llama-2-70b", lambda: _llama("llama-2-70b", 80, 8192, 28672, 64, 8)),
    (r"llama 7b|codellama-7b|llama-2-7b|llama-7b", lambda: _llama("llama-2-7b", 32, 4096, 11008, 32, 32)),
    (r"qwen2 7b|qwen2\.5-7b", lambda: preset("qwen2.5-7b")),
    (r"qwen ?2\.5 ?32b|qwen2\.5-32b", lambda: preset("qwen2.5-32b")),
    (r"qwen2\.5-14b", lambda: replace(preset("qwen2.5-32b"), name="qwen2.5-14b", layers=48, intermediate=13824)),
    (r"qwen3-30b-a3b", lambda: preset("qwen3-30b-a3b")),
    (r"qwen3-235b", lambda: preset("qwen3-235b-a22b")),
    (r"qwen3-14b", lambda: preset("qwen3-14b")),
    (r"qwen3-32b", lambda: preset("qwen3-32b")),
    (r"mixtral", lambda: preset("mixtral-8x7b")),
    (r"deepseek-(r1|v3)", lambda: preset("deepseek-v3")),
    (r"deepseek-(coder-)?v2-lite", lambda: preset("deepseek-v2-lite")),
    (r"gpt-oss-120b", lambda: preset("gpt-oss-120b")),
    (r"gpt-oss-20b", lambda: preset("gpt-oss-20b")),
]
QUANTS = ["Q4_K_M", "Q5_K_M", "Q3_K_L", "Q8_0", "Q4_0", "Q6_K", "IQ4_XS", "MXFP4", "F16", "Q2_K"]
GPUS = [(r"4090", "rtx4090"), (r"3090 ?ti", "rtx3090ti"), (r"3090", "rtx3090"), (r"4080", "rtx4080"),
        (r"a100 80", "a100-80g-pcie"), (r"a6000", "a6000"), (r"5090", "rtx5090"), (r"3070", "rtx3070"),
        (r"rtx pro 6000", "rtx-pro-6000"), (r"5060 ti", "rtx5060ti-16g")]
# CPU regex -> (cores, DRAM when the row does not say: type-rate x channels), from product pages
CPUS = [(r"7950x", 16, "ddr5-6000x2"), (r"7800x3d", 8, "ddr5-6000x2"), (r"13600k", 14, "ddr5-5600x2"),
        (r"13900k", 24, "ddr5-6000x2"), (r"14900k", 24, "ddr5-6000x2"), (r"7965wx", 24, "ddr5-5200x8"),
        (r"6138", 40, "ddr4-2666x12"), (r"6980p", 128, "ddr5-6400x12"), (r"6454s", 32, "ddr5-4800x8"),
        (r"9654|9b14", 96, "ddr5-4800x12"), (r"ryzen 5 3500", 6, "ddr4-2667x2"), (r"i7-8700", 6, "ddr4-2400x2"),
        (r"5900x", 12, "ddr4-3200x2"), (r"5800x", 8, "ddr4-3200x2"), (r"10900x", 10, "ddr4-3200x4"),
        (r"7343", 16, "ddr4-3200x8"), (r"9175f", 16, "ddr5-6400x12"), (r"3995wx", 64, "ddr4-3200x8")]
STAND_IN_GPU = "rtx3090"  # for sweeps whose source does not name the GPU: shape only


@dataclass(frozen=True)
class RowInput:
    spec: ModelSpec
    quant: str
    profile: HardwareProfile
    flags: str
    hardware_stated: bool
    legacy: bool  # a build from before llama.cpp PR #6083 (host weights never copied for prompts)


def _find(table, text: str):
    text = text.lower()
    return next((entry for entry in table if re.search(entry[0], text)), None)


def row_model(row: dict) -> ModelSpec | None:
    found = _find(MODELS, f"{row.get('model') or ''} {row.get('hf_model') or ''}")
    return found[1]() if found else None


def row_quant(row: dict, spec: ModelSpec) -> str | None:
    text = (row.get("quant") or "").upper().replace("Q4_K - MEDIUM", "Q4_K_M")
    if "4-BIT" in text:
        return "Q4_K_M"
    found = next((q for q in QUANTS if q in text), None)
    if found is None and not text and spec.name.startswith("gpt-oss"):
        return "MXFP4"
    if found is None and text in ("Q2_K_M", "UD-Q2_K_XL") or text.startswith("Q2_K"):
        return "Q2_K"
    return found


def row_host(row: dict, profile: HardwareProfile) -> HardwareProfile | None:
    """The row's host on `profile`: the CPU's cores and memory channels, the stated DRAM rate."""
    cpu = _find(CPUS, row.get("cpu") or "")
    if cpu is None:
        return profile
    _, cores, dram = cpu
    if "dual" in (row.get("id") or "") and "6454s" in (row.get("cpu") or "").lower():
        cores, dram = 2 * cores, dram.replace("x8", "x16")
    stated = re.search(r"ddr(\d)-(\d{4})", (row.get("dram") or "").lower())
    if stated:
        kind, rate = stated.groups()
        dram = f"ddr{kind}-{rate}x{dram.rsplit('x', 1)[1]}"
    base = load_profile("cpu").host  # one per-core rate for every CPU (Zen 4 datasheet figures)
    host = replace(base, memory_bytes=4096 * GIB)
    return with_host(replace(profile, host=host, host_reserve_bytes=8 * GIB), dram, cores)


def clean_flags(row: dict, n_layers: int) -> str:
    """The row's placement flags as llama.cpp would read them: descriptions dropped, old
    builds' -ngl semantics (KV caches offloaded only above n_layer + 2) made explicit."""
    text = re.sub(r"\([^)]*\)", " ", row.get("flags") or "")
    if row.get("runtime") == "ktransformers":
        return "-ngl 999 -ot exps=CPU"
    if re.match(r"\s*all \d+ layers on the GPU", text):
        text = "-ngl 999 " + text
    try:
        tokens = shlex.split(text.replace(",", " , ") if "-ot" not in text else text)
    except ValueError:
        tokens = text.split()
    kept, i = [], 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("-") and is_known_flag(token):
            kept.append(token)
            takes_value = IGNORED.get(token, 1)
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            if nxt is not None and (takes_value or nxt in ("0", "1", "on", "off")) and not _is_flag(nxt):
                kept.append(nxt)
                i += 1
        i += 1
    flags = " ".join(shlex.quote(t) for t in kept)
    ngl = re.search(r"-ngl (\d+)", flags)
    if row["id"].startswith("llamabench-readme-sweep") and ngl and int(ngl.group(1)) <= n_layers + 2:
        flags += " -nkvo"  # 2023 builds offloaded the KV cache only above n_layer + 2
    return flags


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not re.fullmatch(r"-\d+", token)


def row_input(row: dict) -> RowInput | str:
    """Everything needed to score `row`, or why it cannot be."""
    spec = row_model(row)
    if spec is None:
        return f"no model description for {row.get('model')!r}"
    quant = row_quant(row, spec)
    if quant is None:
        return f"quantization {row.get('quant')!r} has no llama.cpp file-type description here"
    gpu, stated = row.get("gpu"), True
    if row.get("category") == "cpu-only" or (gpu is None and row.get("gpu_count") == 0):
        profile = load_profile("cpu")
    elif gpu is None:
        profile, stated = load_profile(STAND_IN_GPU), False
    else:
        found = _find(GPUS, gpu)
        if found is None or (row.get("gpu_count") or 1) > 1:
            return f"no single-GPU profile for {gpu!r}"
        profile = load_profile(found[1])
    host = row_host(row, profile)
    stated = stated and bool(row.get("cpu") or row.get("category") == "all-gpu")
    legacy = row["id"].startswith(("llamabench-readme-sweep", "pr4812", "pr4766", "is34"))
    return RowInput(spec, quant, host, clean_flags(row, spec.layers), stated, legacy)
