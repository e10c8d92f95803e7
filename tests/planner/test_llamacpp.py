"""The llama.cpp runtime: its ILP against brute force, flags both ways against GGUF files
written by the `gguf` package, predict == evaluate, --fit baselines, bad flags."""

from __future__ import annotations

import itertools
import random
import re
import shlex
import subprocess
from dataclasses import replace

import pytest

from assets.random_instances import random_profile, random_spec, random_workload
from planner.cost.llamacpp import (LlamaCppSettings, LlamaPlacement, LlamaScenario, evaluate_llamacpp,
                                   memory_llamacpp)
from planner.cost.llamacpp_tensors import types_for_ftype
from planner.errors import OffplanError
from planner.hardware.profile import load_profile
from planner.model.presets import preset
from planner.model.spec import MoE, ModelSpec, Workload
from planner.plan.llamacpp_command import llamacpp_command
from planner.plan.llamacpp_flags import parse_llamacpp_flags
from planner.solve.llamacpp_baselines import fit_choice, layers_placement
from planner.solve.llamacpp_ilp import solve_llamacpp
from planner.solve.llamacpp_predict import predict_llamacpp

gguf = pytest.importorskip("gguf")


def moe_spec(layers: int = 6) -> ModelSpec:
    return ModelSpec(name="tiny-moe", family="mixtral", layers=layers, hidden=64, intermediate=128, heads=4,
                     kv_heads=2, vocab=256, moe=MoE(8, 2, 32), max_context=4096)


def tight_instance(seed: int, layers: int, ffn: str) -> LlamaScenario:
    """A random small model on a made-up machine whose GPU holds part of the weights."""
    rng = random.Random(seed)
    spec = random_spec(rng, layers=layers, ffn=ffn)
    scn = LlamaScenario(spec, random_profile(rng), random_workload(rng),
                        LlamaCppSettings(ubatch=rng.choice((16, 32, 64, 512))))
    empty, _ = memory_llamacpp(scn, LlamaPlacement(frozenset(), (False,) * layers))
    weights = sum(t.n_bytes for t in scn.tensors)
    acc = replace(scn.profile.accelerator, memory_bytes=int(empty.used_bytes + rng.uniform(0.2, 0.9) * weights))
    return replace(scn, profile=replace(scn.profile, accelerator=acc, reserve_bytes=0))


def brute_force(scn: LlamaScenario, monotone: bool) -> float:
    """Fastest fitting placement over every GPU/host choice (each kind of matrix on the GPU for
    the last n layers when `monotone`, the ILP's search space) and every -ngl."""
    movable = [t for t in scn.tensors if t.kind != "token_embd"]
    best = float("inf")
    for mask in itertools.product((False, True), repeat=len(movable)):
        gpu = {t.name for t, on in zip(movable, mask) if on}
        if monotone and any(t.name in gpu and u.name not in gpu for t in movable for u in movable
                            if t.kind == u.kind and t.layer is not None and u.layer == t.layer + 1):
            continue
        for n_kv in range(scn.spec.layers + 1):
            kv = tuple(i >= scn.spec.layers - n_kv for i in range(scn.spec.layers))
            pred = evaluate_llamacpp(scn, LlamaPlacement(frozenset(gpu), kv))
            if pred.fits:
                best = min(best, pred.total_s)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_ilp_equals_brute_force_on_one_layer(seed):
    scn = tight_instance(seed, 1, "swiglu")
    solution = solve_llamacpp(scn)
    assert solution.prediction.fits
    assert solution.prediction.total_s == pytest.approx(brute_force(scn, monotone=False), rel=1e-9)
    assert solution.objective_s == pytest.approx(solution.prediction.total_s, rel=1e-6)


def test_ilp_equals_brute_force_on_two_layers():
    scn = tight_instance(11, 2, "plain")
    assert solve_llamacpp(scn).prediction.total_s == pytest.approx(brute_force(scn, monotone=True), rel=1e-9)


def test_cpu_only_machine_offloads_nothing_prompt_processing_included():
    spec = preset("llama-3.2-1b")
    scn = LlamaScenario(spec, load_profile("cpu"), Workload(1, 512, 64))
    solution = solve_llamacpp(scn)
    assert not solution.placement.gpu and not any(solution.placement.kv_gpu)
    stages = solution.prediction.stages
    assert sum(s.prefill_path.acc_s + s.prefill_path.xfer_s for s in stages) == 0
    assert solution.prediction.vram.used_bytes == 0


# ---- GGUF names ---------------------------------------------------------------------------

def write_gguf(path, arch, spec: ModelSpec, biases: bool = False, moe: bool = False) -> list[str]:
    """A GGUF whose tensor names are the gguf package's own for `arch` (tiny 1-element data)."""
    import numpy as np
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    names = []
    for tensor in gguf.MODEL_TENSORS[arch]:
        base = gguf.TENSOR_NAMES[tensor]
        if "rope_freqs" in base or "rot_embd" in base:
            continue
        if ("_exps" in base or "gate_inp" in base) and not moe:
            continue
        if moe and re.search(r"ffn_(up|gate|down)$", base):  # dense FFN tensors: not in MoE layers
            continue
        layers = range(spec.layers) if "{bid}" in base else [None]
        for layer in layers:
            stem = base.format(bid=layer)
            names.append(stem + ".weight")
            if biases and re.search(r"attn_[qkv]$", stem):
                names.append(stem + ".bias")
    for name in names:
        writer.add_tensor(name, np.zeros(1, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return names


def llama_devices(names: list[str], args: tuple[str, ...], n_layers: int) -> dict[str, bool]:
    """Where llama.cpp puts each tensor for these arguments: -ngl, then -ot / --n-cpu-moe in
    order, the first matching pattern winning (std::regex_search)."""
    ngl, overrides, i = 0, [], 0
    while i < len(args):
        if args[i] == "-ngl":
            ngl = int(args[i + 1])
        elif args[i] == "-ot":
            pattern, buffer = args[i + 1].rsplit("=", 1)
            overrides.append((pattern, buffer != "CPU"))
        elif args[i] == "--n-cpu-moe":
            overrides += [(rf"blk\.{j}\.ffn_(up|down|gate)_exps", False) for j in range(int(args[i + 1]))]
        i += 1
    out = {}
    for name in names:
        match = re.match(r"blk\.(\d+)\.", name)
        on = int(match.group(1)) >= n_layers - min(ngl, n_layers) if match else (name.startswith("output.")
                                                                                and ngl > n_layers)
        for pattern, to_gpu in overrides:
            if re.search(pattern, name):
                on = to_gpu
                break
        out[name] = on
    return out


@pytest.mark.parametrize("arch, biases, moe", [("LLAMA", False, False), ("QWEN2", True, False),
                                                ("QWEN3MOE", False, True)])
def test_emitted_patterns_match_exactly_the_planned_tensors_of_a_gguf(tmp_path, arch, biases, moe):
    spec = moe_spec() if moe else replace(preset("llama-3.2-1b"), layers=12)
    names = write_gguf(tmp_path / "m.gguf", getattr(gguf.MODEL_ARCH, arch), spec, biases, moe)
    from planner.model.gguf import read_gguf_header
    names = [t.name for t in read_gguf_header(tmp_path / "m.gguf")["tensors"]]
    scn = LlamaScenario(spec, load_profile("rtx4090"), Workload(1, 64, 16))
    planned = {t.name for t in scn.tensors}
    assert planned - {"token_embd.weight"} <= set(names)  # offplan's names are the file's names
    rng = random.Random(len(names))
    n = spec.layers
    for trial in range(60):
        n_kv = rng.randint(0, n)
        kv = tuple(i >= n - n_kv for i in range(n))
        if trial % 3 == 0:  # arbitrary matrices
            gpu = {t.name for t in scn.tensors if t.kind != "token_embd" and rng.random() < 0.5}
        else:  # per kind, the last layers (what the ILP produces)
            counts = {t.kind: rng.randint(0, n) for t in scn.tensors}
            gpu = {t.name for t in scn.tensors if t.kind not in ("token_embd",)
                   and (t.layer is None and rng.random() < 0.5 or t.layer is not None and t.layer >= n - counts[t.kind])}
        lp = LlamaPlacement(frozenset(gpu), kv)
        cmd = llamacpp_command(scn, lp)
        devices = llama_devices(names, cmd.args, n)
        for name in names:
            weight = name.removesuffix(".bias") + ".weight" if name.endswith(".bias") else name
            if weight in planned and weight != "token_embd.weight" and weight.startswith("blk."):
                assert devices[name] == (weight in gpu), (name, cmd.line())
            elif name in planned and name != "token_embd.weight":
                assert devices[name] == (name in gpu), (name, cmd.line())
            else:  # norms, biases, routers, embeddings keep what -ngl gives them
                assert devices[name] == llama_devices([name], ("-ngl", str(cmd.ngl)), n)[name], (name, cmd.line())
        assert parse_llamacpp_flags(shlex.join(cmd.args), scn).placement == lp


def test_experts_of_the_first_layers_become_n_cpu_moe():
    spec = moe_spec(8)
    scn = LlamaScenario(spec, load_profile("rtx4090"), Workload(1, 64, 16))
    lp = layers_placement(scn, 9, n_cpu_moe=3)
    cmd = llamacpp_command(scn, lp)
    assert cmd.n_cpu_moe == 3 and cmd.overrides == () and cmd.ngl == 9
    assert "--n-cpu-moe" in cmd.args and cmd.ollama_num_gpu is None


def test_whole_layers_give_an_ollama_num_gpu_line():
    spec = preset("llama-3.1-8b")
    scn = LlamaScenario(spec, load_profile("rtx3060"), Workload(1, 512, 64))
    cmd = llamacpp_command(scn, layers_placement(scn, 20))
    assert cmd.ngl == 20 and cmd.ollama_num_gpu == 20 and cmd.overrides == ()


# ---- predict ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expect", [
    ("-ngl 20 -c 4096", lambda s: layers_placement(s, 20)),
    ("-ngl 99 -nkvo -t 8 -fa 1", lambda s: LlamaPlacement(layers_placement(s, 99).gpu, (False,) * s.spec.layers,
                                                          nkvo=True)),
    ("-ngl 99 -ot 'ffn_.*_exps=CPU'", lambda s: layers_placement(s, 99, n_cpu_moe=s.spec.layers)),
    ("--n-cpu-moe 4 -ngl 99 -ub 128", lambda s: layers_placement(s, 99, n_cpu_moe=4)),
])
def test_predict_on_flags_equals_evaluate_on_the_same_placement(flags, expect):
    spec = moe_spec(8) if "exps" in flags or "moe" in flags else preset("llama-3.1-8b")
    profile, workload = load_profile("rtx4090"), Workload(1, 512, 64)
    types = types_for_ftype(spec, "Q4_K_M")
    forecast = predict_llamacpp(spec, profile, workload, flags, types)
    scn = LlamaScenario(spec, profile, workload, forecast.scenario.settings, types)
    direct = evaluate_llamacpp(scn, expect(scn))
    assert forecast.placement == expect(scn)
    assert forecast.prediction == direct
    assert forecast.prefill_tok_s == pytest.approx(512 / direct.prefill_s)
    assert forecast.decode_tok_s == pytest.approx(1 / direct.decode_step_s)


def test_settings_flags_reach_the_scenario():
    spec = preset("llama-3.1-8b")
    f = predict_llamacpp(spec, load_profile("rtx4090"), Workload(1, 512, 64),
                         "-ngl 10 -c 8192 -ub 256 -b 1024 -ctk q8_0 -fa 0 --no-mmap -t 4")
    s = f.scenario.settings
    assert (s.ctx, s.ubatch, s.batch, s.cache_type_k, s.flash_attn, s.mmap, s.threads) == \
        (8192, 256, 1024, "Q8_0", False, False, 4)
    assert f.scenario.ctx_tokens == 8192


def test_nkvo_keeps_prompt_attention_on_the_cpu_unlike_a_layer_left_off_the_gpu():
    """-nkvo pins attention to the CPU; a host cache of a layer -ngl leaves out is read by the
    GPU in a big micro-batch, so prompts slow down far more with -nkvo."""
    spec = preset("llama-3.1-8b")
    args = (spec, load_profile("rtx4090"), Workload(1, 2048, 16))
    nkvo = predict_llamacpp(*args, "-ngl 99 -nkvo")
    left_off = predict_llamacpp(*args, "-ngl 0 -ot 'blk=CUDA0' -ot 'output=CUDA0'")
    assert nkvo.placement.gpu == left_off.placement.gpu and nkvo.placement.kv_gpu == left_off.placement.kv_gpu
    assert nkvo.prefill_tok_s < 0.5 * left_off.prefill_tok_s
    assert "-nkvo" in llamacpp_command(nkvo.scenario, nkvo.placement).args
    assert "-nkvo" not in llamacpp_command(left_off.scenario, left_off.placement).args


def test_kv_in_host_memory_costs_decode_time():
    spec = preset("llama-3.1-8b")
    args = (spec, load_profile("rtx4090"), Workload(1, 512, 128))
    on_gpu, on_host = predict_llamacpp(*args, "-ngl 99"), predict_llamacpp(*args, "-ngl 99 -nkvo")
    assert on_host.decode_tok_s < 0.8 * on_gpu.decode_tok_s
    assert on_host.prefill_tok_s < on_gpu.prefill_tok_s
    assert on_host.prediction.vram.kv_bytes == 0 < on_gpu.prediction.vram.kv_bytes


@pytest.mark.parametrize("flags, needle", [("-ngl 10 --frobnicate 3 -zz", "--frobnicate, -zz"),
                                           ("-ngl ten", "-ngl 'ten'"), ("-ot 'exps'", "PATTERN=BUFFER"),
                                           ("-ot 'x=NPU9'", "unknown buffer"), ("-ctk q3", "cache type")])
def test_bad_flags_are_named(flags, needle):
    spec = preset("llama-3.2-1b")
    with pytest.raises(OffplanError, match=re.escape(needle)):
        predict_llamacpp(spec, load_profile("rtx4090"), Workload(1, 64, 16), flags)


def offplan(*args: str) -> subprocess.CompletedProcess:
    """The command line's entry point, run in this process (same exit code and output)."""
    from conftest import offplan_in_process
    return offplan_in_process(*args)


def test_cli_bad_flags_give_one_line_and_exit_2():
    r = offplan("predict", "llama-3.2-1b", "--hw", "rtx4090", "--llamacpp", "-ngl 10 --bogus 1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--bogus" in r.stderr


def test_cli_predict_json_has_the_promised_keys():
    import json
    r = offplan("predict", "llama-3.2-1b", "--hw", "rtx3060", "--llamacpp", "-ngl 8 -t 8", "--json",
                "--prompt", "256", "--gen", "32")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "fits", "accelerator_bytes", "host_bytes", "bound_by"):
        assert key in data
    assert data["prompt"] == 256 and data["fits"] is True and data["decode_tok_s"] > 0


# ---- baselines ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, hw", [("llama-3.1-8b", "rtx3060"), ("qwen2.5-7b", "rtx4060ti-16g")])
def test_plan_is_never_slower_than_fit(name, hw):
    spec = preset(name)
    scn = LlamaScenario(spec, load_profile(hw), Workload(1, 512, 128), types=types_for_ftype(spec, "Q8_0"))
    fit = fit_choice(scn)
    best = solve_llamacpp(scn).prediction
    assert fit.prediction is not None
    assert best.total_s <= fit.prediction.total_s * (1 + 1e-3)


def test_fit_moves_experts_before_layers():
    spec = moe_spec(8)
    scn = LlamaScenario(spec, load_profile("rtx4090"), Workload(1, 64, 16))
    full = evaluate_llamacpp(scn, layers_placement(scn, 9))
    experts = sum(t.n_bytes for t in scn.tensors if t.kind.endswith("_exps")) / 8
    profile = replace(scn.profile, accelerator=replace(scn.profile.accelerator, used_by_others_bytes=int(
        scn.profile.vram_usable_bytes - full.vram.used_bytes - 2**30 + 2.5 * experts)))
    fit = fit_choice(replace(scn, profile=profile))
    assert fit.note.startswith("-ngl 9 --n-cpu-moe") and fit.note != "-ngl 9 --n-cpu-moe 0"


# ---- commands -----------------------------------------------------------------------------

EXAMPLES = sorted(p for p in (__import__("pathlib").Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_shipped_example_is_at_least_as_fast_as_fit(example):
    from planner.model.modelfile import load_model_file
    from planner.solve.llamacpp_solve import solve_for_llamacpp
    model = load_model_file(str(example))
    scn = LlamaScenario(model.spec, load_profile("rtx4090"), model.workload or Workload())
    result = solve_for_llamacpp(scn)
    assert result.fit.prediction is not None and result.speedup_over_fit >= 1 - 1e-3
    assert result.command.line().startswith("llama-server -m ")


def test_a_llamacpp_plan_exports_and_simulates_as_it_was_solved(tmp_path):
    import json
    plan = tmp_path / "plan.yaml"
    r = offplan("solve", "llama-3.1-8b", "--hw", "rtx3060", "--runtime", "llamacpp", "--quant", "Q4_K_M",
                "--out", str(plan), "--json")
    assert r.returncode == 0, r.stderr
    solved = json.loads(r.stdout)
    exported = offplan("export", str(plan))
    assert exported.returncode == 0
    assert exported.stdout.splitlines()[0].split()[3:] == solved["command"].split()[3:]  # after -m FILE
    sim = json.loads(offplan("simulate", str(plan), "--json").stdout)
    assert sim["runtime"] == "llamacpp"
    assert 1 / sim["decode_step_s"] == pytest.approx(solved["decode_tok_s"], rel=1e-9)
    from planner.plan.record import load_plan
    assert load_plan(plan).evaluate().decode_tokens_per_s == pytest.approx(solved["decode_tok_s"], rel=1e-9)


def test_ctx_sizes_the_kv_cache_of_a_llamacpp_plan():
    import json
    args = ("solve", "llama-3.1-8b", "--hw", "rtx3060", "--runtime", "llamacpp", "--quant", "Q4_K_M", "--json")
    short, long = (json.loads(offplan(*args, *extra).stdout) for extra in ((), ("--ctx", "131072")))
    assert short["command"].endswith("-c 640") and long["command"].endswith("-c 131072")
    assert long["decode_tok_s"] < short["decode_tok_s"]  # the long cache leaves less room for weights
    bad = offplan(*args, "--ctx", "100")
    assert bad.returncode == 2 and "--ctx 100" in bad.stderr


def test_cpu_only_machine_plans_for_llamacpp_and_refuses_the_executor():
    r = offplan("solve", "llama-3.2-1b", "--hw", "cpu", "--runtime", "llamacpp", "--dram", "ddr5-4800x2", "--json")
    import json
    data = json.loads(r.stdout)
    assert data["ngl"] == 0 and data["speedup_over_fit"] == pytest.approx(1.0) and data["accelerator_bytes"] == 0
    bad = offplan("solve", "llama-3.2-1b", "--hw", "cpu")
    assert bad.returncode == 2 and "--runtime llamacpp" in bad.stderr


@pytest.mark.parametrize("n_layers", [1, 10, 48, 61, 126])
def test_layer_alternatives_match_exactly_their_layers(n_layers):
    from planner.plan.llamacpp_command import _layers_regex
    rng = random.Random(n_layers)
    for trial in range(100):
        layers = (sorted(rng.sample(range(n_layers), rng.randint(1, n_layers))) if trial % 2
                  else list(range(rng.randint(0, n_layers - 1), n_layers)))
        pattern = re.compile(rf"^blk\.{_layers_regex(layers, n_layers)}\.ffn_up\.weight$")
        matched = [i for i in range(n_layers) if pattern.search(f"blk.{i}.ffn_up.weight")]
        assert matched == layers, pattern.pattern
