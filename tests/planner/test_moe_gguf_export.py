"""MoE GGUF files written by the `gguf` package: the spec read from each header (per-tensor
types, MXFP4 experts, MLA, dense-first layers), and llama.cpp / transformers exports whose
patterns match exactly the tensors they mean."""

from __future__ import annotations

import re

import pytest

from planner.cost.options import Scenario
from planner.hardware.profile import load_profile
from planner.model.gguf import read_gguf_header
from planner.model.gguf_spec import spec_from_gguf
from planner.model.placement import Placement, uniform_placement
from planner.model.spec import Workload
from planner.plan.export import hf_device_map, llamacpp_args
from planner.plan.record import make_plan
from gguf_models import EXPERTS, LAYERS, write_deepseek2, write_gemma3, write_glm4moe, write_gpt_oss, write_qwen3moe

NORMS = re.compile(r"(norm|sinks)\.weight$")


def _matrix_bytes(path) -> int:
    """What the file stores beyond norms and sinks (kept in F32 there, fp16 in offplan's count)."""
    return sum(t.n_bytes for t in read_gguf_header(path)["tensors"] if not NORMS.search(t.name))


@pytest.mark.parametrize("writer", [write_qwen3moe, write_gpt_oss, write_deepseek2, write_gemma3])
def test_spec_bytes_equal_the_file_tensor_by_tensor_type(tmp_path, writer):
    path = writer(tmp_path / "m.gguf")
    spec = spec_from_gguf(path)
    assert spec.weight_bytes - spec.norm_bytes == _matrix_bytes(path)


def test_glm4moe_leaves_out_the_multi_token_prediction_block(tmp_path):
    path = write_glm4moe(tmp_path / "g.gguf")
    spec = spec_from_gguf(path)
    assert (spec.family, spec.layers, spec.moe.dense_first, spec.moe.shared_intermediate) == ("glm4_moe", LAYERS, 1, 256)
    assert spec.attention_bias and spec.moe.router_bias and spec.weight_bits["lm_head"] == 6.5625
    mtp = sum(t.n_bytes for t in read_gguf_header(path)["tensors"]
              if t.name.startswith(f"blk.{LAYERS}.") and not NORMS.search(t.name))
    assert spec.weight_bytes - spec.norm_bytes == _matrix_bytes(path) - mtp


def test_gemma3_windows_five_local_layers_per_global_one(tmp_path):
    spec = spec_from_gguf(write_gemma3(tmp_path / "g.gguf"))
    assert (spec.family, spec.ffn, spec.tied_embeddings, spec.qk_norm) == ("gemma3", "geglu", True, True)
    assert [spec.is_sliding(i) for i in range(6)] == [True] * 5 + [False]
    assert spec.kv_cache_bytes(4096) == (5 * 1024 + 4096) * spec.kv_bytes_per_token_layer


def test_quantized_output_and_experts_keep_their_own_types(tmp_path):
    spec = spec_from_gguf(write_qwen3moe(tmp_path / "q.gguf"))
    assert spec.family == "qwen3_moe" and spec.qk_norm
    assert spec.weight_bits["lm_head"] == 6.5625 and spec.weight_bits["embed_tokens"] == 4.5  # Q6_K, Q4_K
    assert spec.by_name["lm_head"].n_bytes == 512 * 256 * 6.5625 / 8
    matrices = [t for t in read_gguf_header(tmp_path / "q.gguf")["tensors"] if not NORMS.search(t.name)]
    assert spec.params == sum(t.n_elements for t in matrices)
    from planner.cli.render import model_line
    assert model_line(spec).startswith("tiny: 7.3M parameters (2.6M active), 4 layers, 5.")


def test_gpt_oss_reads_mxfp4_experts_sinks_and_windows(tmp_path):
    spec = spec_from_gguf(write_gpt_oss(tmp_path / "g.gguf"))
    assert spec.weight_bits["experts"] == 4.25 and spec.attention_sinks and spec.attention_bias
    assert (spec.sliding_window, spec.full_every) == (128, 2) and spec.moe.expert_bias and spec.moe.router_bias


def test_deepseek2_reads_mla_shared_experts_and_dense_first_layer(tmp_path):
    spec = spec_from_gguf(write_deepseek2(tmp_path / "d.gguf"))
    assert spec.family == "deepseek_v3" and spec.mla.kv_lora_rank == 64 and spec.mla.q_lora_rank == 128
    assert spec.moe.dense_first == 1 and spec.moe.shared_intermediate == 256 and spec.moe.router_bias
    assert spec.kv_bytes_per_token_layer == (64 + 32) * 2
    assert "layers.0.mlp.gate_proj" in spec.by_name and "layers.1.mlp.experts" in spec.by_name


def _plan(spec, gpu_layers: set[int], attn_cpu: tuple[int, ...] = ()):
    placement = uniform_placement(spec, "gpu")
    devices = dict(placement.devices)
    for t in spec.tensors():
        if t.experts and t.layer not in gpu_layers:
            devices[t.name] = "cpu"
        if t.layer in attn_cpu and t.kind == "k_proj":
            devices[t.name] = "cpu"
    scn = Scenario(spec, load_profile("rtx4090"), Workload(1, 64, 8))
    return make_plan(scn, Placement(devices, placement.kv_host_fraction), "test")


def _matches(args: list[str], names: list[str]) -> set[str]:
    """Tensors llama.cpp would place on the CPU: `-ot REGEX=CPU` with std::regex_search semantics."""
    out = set()
    for flag, value in zip(args, args[1:]):
        if flag == "-ot":
            regex, buffer = value.rsplit("=", 1)
            assert buffer == "CPU"
            out |= {n for n in names if re.search(regex, n)}
    return out


def test_expert_patterns_match_exactly_the_banks_of_the_cpu_layers(tmp_path):
    path = write_gpt_oss(tmp_path / "g.gguf")  # experts with biases: weight and bias move together
    names = [t.name for t in read_gguf_header(path)["tensors"]]
    spec = spec_from_gguf(path)
    args, _ = llamacpp_args(_plan(spec, gpu_layers={0, 2}, attn_cpu=(3,)))
    intended = {n for n in names if re.fullmatch(r"blk\.(1|3)\.ffn_(gate|up|down)_exps\.(weight|bias)", n)}
    assert _matches(args, names) == intended | {"blk.3.attn_k.weight"}
    assert "--n-cpu-moe" not in args


def test_first_layers_on_the_cpu_become_n_cpu_moe(tmp_path):
    spec = spec_from_gguf(write_qwen3moe(tmp_path / "q.gguf"))
    args, _ = llamacpp_args(_plan(spec, gpu_layers={2, 3}))
    assert args == ["-ngl", "999", "--n-cpu-moe", "2"]
    assert llamacpp_args(_plan(spec, gpu_layers=set()))[0] == ["-ngl", "999", "--cpu-moe"]
    assert llamacpp_args(_plan(spec, gpu_layers=set(range(LAYERS))))[0] == ["-ngl", "999"]


def test_split_banks_become_whole_layers_with_a_note(tmp_path):
    spec = spec_from_gguf(write_qwen3moe(tmp_path / "q.gguf"))
    plan = _plan(spec, gpu_layers=set())
    half = {f"layers.{i}.mlp.experts": EXPERTS // 2 for i in range(LAYERS)}
    from dataclasses import replace
    plan = replace(plan, placement=replace(plan.placement, gpu_experts=half))
    args, notes = llamacpp_args(plan)
    assert args == ["-ngl", "999", "--n-cpu-moe", "2"]  # 4 x 4 of 8 experts = 2 whole layers
    assert any("16 resident experts in 4 split layers become 2 whole layers" in n for n in notes)


def test_deepseek_mla_patterns(tmp_path):
    path = write_deepseek2(tmp_path / "d.gguf")
    names = [t.name for t in read_gguf_header(path)["tensors"]]
    spec = spec_from_gguf(path)
    placement = uniform_placement(spec, "gpu")
    devices = {**placement.devices, "layers.2.self_attn.kv_b_proj": "cpu", "layers.2.mlp.gate": "cpu",
               "layers.3.mlp.shared_experts.down_proj": "cpu"}
    plan = make_plan(Scenario(spec, load_profile("rtx4090"), Workload(1, 64, 8)),
                     Placement(devices, placement.kv_host_fraction), "test")
    assert _matches(llamacpp_args(plan)[0], names) == {"blk.2.attn_kv_b.weight", "blk.2.ffn_gate_inp.weight",
                                                       "blk.3.ffn_down_shexp.weight"}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "glm4_moe"])
def test_hf_device_map_names_modules_the_model_has(family):
    torch = pytest.importorskip("torch")
    from test_families import tiny_configs
    from planner.model.hfconfig import spec_from_hf_config
    import transformers
    config = tiny_configs()[family]
    spec = spec_from_hf_config(config.to_dict(), family)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    modules = {name for name, _ in model.named_modules()}
    plan = _plan(spec, gpu_layers={spec.layers - 1})
    device_map, _ = hf_device_map(plan)
    assert set(device_map) <= modules
    assert device_map[f"model.layers.{spec.layers - 1}.mlp.experts"] == 0
    assert device_map["model.layers.1.mlp.experts"] == "cpu"


def test_ktransformers_gets_one_resident_count_per_layer(tmp_path):
    from planner.plan.export_moe import ktransformers_args
    from planner.errors import PlanError
    spec = spec_from_gguf(write_qwen3moe(tmp_path / "q.gguf"))
    args, notes = ktransformers_args(_plan(spec, gpu_layers={2, 3}))  # 0, 0, 8, 8 experts resident
    assert args == ["--kt-num-gpu-experts", "4", "--kt-expert-placement-strategy", "uniform"]
    assert any("0-8 per layer become 4" in n for n in notes)
    dense = spec_from_gguf(write_qwen3moe(tmp_path / "d.gguf"))
    from dataclasses import replace
    dense = replace(dense, moe=None, family="qwen3")
    with pytest.raises(PlanError, match="no routed experts"):
        ktransformers_args(_plan(dense, gpu_layers=set()))
