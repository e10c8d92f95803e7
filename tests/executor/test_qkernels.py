"""Fused quantized kernels: packed layouts keep the planned bytes, logits match the dequantized
float model wherever a matrix is placed, and no matmul builds a whole-matrix temporary."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import tiny_spec
from executor import qkernels, quant
from executor.compensate_model import compensate_model
from executor.offload import PlacedLinear, QuantKernel, apply_plan
from executor.quant import QuantLinear, dequantize, quant_matmul, quantize
from executor.streams import Devices
from executor.weights import synthetic_model
from planner.cost.options import Scenario
from planner.hardware.profile import load_profile
from planner.model.placement import uniform_placement
from planner.model.spec import Quantization, Workload
from planner.plan.record import make_plan

PROFILE = load_profile(str(Path(__file__).parent.parent / "assets" / "loopback-test.yaml"))
CPU = Devices(torch.device("cpu"), torch.device("cpu"))
FORMATS = [Quantization(4, 32, True), Quantization(4, 64, False), Quantization(8, 0, True),
           Quantization(8, 0, False)]
# bf16 activations into the kernels (8 significant bits): relative error of the logits.
KERNEL_RTOL = 2e-2


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_packing_keeps_the_planned_bytes_and_the_dequantized_product(fmt):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    qt = quantize(w, fmt.bits, fmt.group_size, fmt.symmetric)
    packed = qkernels.pack(qt, "cpu")
    assert packed.layout == "cpu" and packed.symmetric == fmt.symmetric
    assert packed.nbytes == qt.nbytes == fmt.bytes_for(48 * 128, 128)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    expected = x @ dequantize(qt).T  # [3, 48]
    torch.testing.assert_close(quant_matmul(x, packed), expected, rtol=KERNEL_RTOL,
                               atol=KERNEL_RTOL * float(expected.abs().max()))


def test_fused_matmuls_never_dequantize_and_the_fallback_stays_in_chunks(monkeypatch):
    sizes = []
    original = quant.dequantize

    def recording(qt, dtype=torch.float32):
        sizes.append(qt.shape[0] * qt.shape[1])
        return original(qt, dtype)

    monkeypatch.setattr(quant, "dequantize", recording)
    monkeypatch.setattr(quant, "DEQUANT_CHUNK_WEIGHTS", 4096)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 256)
    quant_matmul(x, qkernels.pack(quantize(w, 4, 128), "cpu"))
    assert sizes == []
    fallback = quantize(w, 4, 16)  # a group size the int4 kernels do not take
    assert qkernels.pack(fallback, "cpu").layout == "ref"
    y = quant_matmul(x, fallback)
    assert sizes and max(sizes) <= 4096 and sum(sizes) == 96 * 256
    torch.testing.assert_close(y, x @ original(fallback).T)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The float model the quantized one stands for: every QuantLinear becomes an nn.Linear
    holding its dequantized weight."""
    reference = copy.deepcopy(model)
    for name, module in list(reference.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = dequantize(module.quantized())
            if module.bias is not None:
                linear.bias.data = module.bias.clone()
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, linear)
    return reference


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_quantized_logits_match_the_dequantized_model_on_every_placement(fmt):
    spec = tiny_spec(name="fused", layers=2, quantization=fmt)
    workload = Workload(1, 10, 2)
    prompt = torch.randint(0, spec.vocab, (1, workload.prompt), generator=torch.Generator().manual_seed(2))
    logits = {}
    for device in ("float", "gpu", "stream", "cpu"):
        placement = uniform_placement(spec, "gpu" if device == "float" else device)
        plan = make_plan(Scenario(spec, PROFILE, workload), placement, "test")
        model = synthetic_model(spec, seed=0)
        with compensate_model(model, plan):
            if device == "float":
                model = dequantized_copy(model)
            handle = apply_plan(model, plan, CPU, max_tokens=workload.context)
            try:
                handle.begin("prefill")
                logits[device] = model(prompt)  # [1, prompt, vocab]
            finally:
                handle.close()
        if device != "float":  # the fused kernels ran, wherever the matrices were
            layouts = {m.layout for m in model.modules() if isinstance(m, QuantLinear)}
            layouts |= {m.kernel.layout.layout for m in model.modules() if isinstance(m, PlacedLinear)
                        and isinstance(m.kernel, QuantKernel)}
            assert layouts == {"cpu"}, device
    reference = logits.pop("float")
    scale = float(reference.abs().max())
    for device, value in logits.items():
        torch.testing.assert_close(value, reference, rtol=KERNEL_RTOL, atol=KERNEL_RTOL * scale, msg=device)
        assert not torch.equal(value, reference)  # bf16 activations: not the float path
