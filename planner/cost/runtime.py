"""Runtimes as data (DESIGN §2, §4): which placements a runtime can express and how it
schedules them. The cost model, the ILP and the prediction take a Runtime as an input;
`offplan` is this project's executor, `llamacpp` is llama.cpp (llama-server, llama-cli,
llama-bench, and Ollama, which hands placement to llama.cpp).

llama.cpp's figures come from its source (ggml/src/ggml-cuda/ggml-cuda.cu,
src/llama-model.cpp, common/arg.cpp):
- a weight lives on the GPU or in host memory (`-ngl`, `-ot`); nothing streams per token;
- token embeddings stay in host memory (the lookup is a GET_ROWS on the CPU);
- a layer's KV cache and attention live with the layer (`-ngl` offloads the last N layers),
  or all in host memory with `-nkvo`;
- prompts run in micro-batches of `-ub` tokens (default 512). For a micro-batch of at least
  32 tokens (`min_batch_size` in ggml_backend_cuda_device_offload_op), a matrix held in host
  memory is copied to the GPU and multiplied there, layer after layer, the copy before the
  compute and not overlapped with it; below 32 tokens it is multiplied by the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import OffplanError


@dataclass(frozen=True)
class Runtime:
    name: str
    weight_devices: tuple[str, ...]  # where one weight tensor may live and be computed
    embed_devices: tuple[str, ...]  # where the token embedding table may live
    kv_host_levels: tuple[float, ...]  # host shares a layer's KV cache may take
    kv_with_layer: bool  # KV and attention sit on their layer's device (or all on the host)
    offloaded_layers_last: bool  # the layers with KV on the GPU are the last ones (-ngl N)
    prefill_copy_min_rows: int  # host-held weights go to the GPU for batches >= this (0 = never)
    prefill_copy_overlapped: bool  # that copy overlaps compute (offplan) or precedes it (llama.cpp)
    micro_batch_tokens: int  # prompt processed this many tokens at a time by default (0 = all)
    decode_streaming: bool  # host-held weights may be copied in per decode step


OFFPLAN = Runtime("offplan", ("gpu", "stream", "cpu"), ("gpu", "cpu"),
                  (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0), False, False, 1, True, 0, True)
# llama.cpp: -ub default 512 (common/common.h n_ubatch); min_batch_size 32 (ggml-cuda.cu).
LLAMACPP = Runtime("llamacpp", ("gpu", "cpu"), ("cpu",), (0.0, 1.0), True, True, 32, False, 512, False)
RUNTIMES = {r.name: r for r in (OFFPLAN, LLAMACPP)}


def runtime_named(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise OffplanError(f"--runtime {name!r}: choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]
