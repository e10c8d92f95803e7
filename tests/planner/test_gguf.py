"""GGUF header reader and ModelSpec from GGUF: tiny files written with struct."""

from __future__ import annotations

import struct
import tracemalloc

import pytest

from planner.errors import SpecError
from planner.model.gguf import GGML_TYPES, SkippedArray, TensorInfo, read_gguf_header
from planner.model.gguf_spec import quantization_for_bits, spec_from_gguf, weight_format

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
        F64: "d"}
T_F32, T_F16, T_Q4_0, T_Q8_0, T_BF16 = 0, 1, 2, 8, 30
T_Q2_K, T_Q3_K, T_Q4_K, T_Q5_K, T_Q6_K = 10, 11, 12, 13, 14

# a tiny llama: hidden 256, 4 heads of 64, 2 KV heads, FFN 512, 2 layers, vocab 1000
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, VOCAB = 256, 4, 2, 64, 512, 2, 1000


# ---- a minimal GGUF writer --------------------------------------------------------------------

def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _value(vtype: int, value) -> bytes:
    if vtype == STR:
        return _string(value)
    if vtype == ARR:
        elem_type, items = value
        return struct.pack("<IQ", elem_type, len(items)) + b"".join(_value(elem_type, v) for v in items)
    return struct.pack("<" + _FMT[vtype], value)


def _kv(key: str, vtype: int, value) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + _value(vtype, value)


def _align(n: int, alignment: int = 32) -> int:
    return -(-n // alignment) * alignment


def gguf_bytes(kvs: list[tuple[str, int, object]], tensors: list[tuple[str, tuple[int, ...], int]],
               version: int = 3) -> tuple[bytes, int]:
    """Header bytes and the total file size (header + aligned tensor data)."""
    infos, cursor = b"", 0
    for name, dims, ggml_type in tensors:
        info = TensorInfo(name, dims, ggml_type, _align(cursor))
        infos += _string(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        infos += struct.pack("<IQ", ggml_type, info.offset)
        cursor = info.offset + info.n_bytes
    header = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs))
    header += b"".join(_kv(*kv) for kv in kvs) + infos
    return header, _align(len(header)) + cursor


def write_gguf(path, kvs, tensors, version: int = 3):
    header, total_bytes = gguf_bytes(kvs, tensors, version)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(total_bytes)  # tensor data: zeros (sparse on disk)
    return path


def llama_kvs(arch: str = "llama", tokens: int = VOCAB, **extra) -> list:
    kvs = [
        ("general.architecture", STR, arch),
        ("general.name", STR, "tiny-llama"),
        (f"{arch}.block_count", U32, LAYERS),
        (f"{arch}.context_length", U32, 4096),
        (f"{arch}.embedding_length", U32, HIDDEN),
        (f"{arch}.feed_forward_length", U32, FFN),
        (f"{arch}.attention.head_count", U32, HEADS),
        (f"{arch}.attention.head_count_kv", U32, KV_HEADS),
        (f"{arch}.rope.freq_base", F32, 500000.0),
        (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("tokenizer.ggml.model", STR, "gpt2"),
        ("tokenizer.ggml.tokens", ARR, (STR, [f"tok{i}" for i in range(tokens)])),
    ]
    return kvs + [(key, vtype, value) for key, (vtype, value) in extra.items()]


def llama_tensors(weight_type: int = T_F16, down_type: int | None = None, output: bool = True,
                  bias: bool = False, experts: int = 0) -> list:
    tensors = [("token_embd.weight", (HIDDEN, VOCAB), weight_type), ("output_norm.weight", (HIDDEN,), T_F32)]
    if output:
        tensors.append(("output.weight", (HIDDEN, VOCAB), weight_type))
    for layer in range(LAYERS):
        b = f"blk.{layer}"
        tensors += [(f"{b}.attn_norm.weight", (HIDDEN,), T_F32), (f"{b}.ffn_norm.weight", (HIDDEN,), T_F32),
                    (f"{b}.attn_q.weight", (HIDDEN, HEADS * HEAD_DIM), weight_type),
                    (f"{b}.attn_k.weight", (HIDDEN, KV_HEADS * HEAD_DIM), weight_type),
                    (f"{b}.attn_v.weight", (HIDDEN, KV_HEADS * HEAD_DIM), weight_type),
                    (f"{b}.attn_output.weight", (HEADS * HEAD_DIM, HIDDEN), weight_type)]
        if bias:
            widths = (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM))
            tensors += [(f"{b}.attn_{p}.bias", (n,), T_F32) for p, n in widths]
        down = weight_type if down_type is None else down_type
        if experts:
            tensors += [(f"{b}.ffn_gate_inp.weight", (HIDDEN, experts), T_F32),
                        (f"{b}.ffn_gate_exps.weight", (HIDDEN, FFN, experts), weight_type),
                        (f"{b}.ffn_up_exps.weight", (HIDDEN, FFN, experts), weight_type),
                        (f"{b}.ffn_down_exps.weight", (FFN, HIDDEN, experts), down)]
        else:
            tensors += [(f"{b}.ffn_gate.weight", (HIDDEN, FFN), weight_type),
                        (f"{b}.ffn_up.weight", (HIDDEN, FFN), weight_type),
                        (f"{b}.ffn_down.weight", (FFN, HIDDEN), down)]
    return tensors


# ---- header -----------------------------------------------------------------------------------

def test_header_reads_every_value_type_and_tensor_info(tmp_path):
    kvs = [("a.u8", U8, 200), ("a.i8", I8, -100), ("a.u16", U16, 60000), ("a.i16", I16, -30000),
           ("a.u32", U32, 4_000_000_000), ("a.i32", I32, -2_000_000_000), ("a.f32", F32, 0.25),
           ("a.bool", BOOL, True), ("a.str", STR, "héllo"), ("a.u64", U64, 2**40), ("a.i64", I64, -(2**40)),
           ("a.f64", F64, 1e-300), ("a.f32_tenth", F32, 0.1), ("a.ints", ARR, (I32, [1, -2, 3])), ("a.strs", ARR, (STR, ["x", "yz"])),
           ("a.nested", ARR, (ARR, [(U8, [1, 2]), (U8, [])])), ("a.bools", ARR, (BOOL, [True, False]))]
    tensors = [("w", (64, 32), T_F16), ("n", (64,), T_F32), ("q", (256, 4), T_Q4_K)]
    header = read_gguf_header(write_gguf(tmp_path / "m.gguf", kvs, tensors))
    assert (header["version"], header["tensor_count"], header["kv_count"]) == (3, 3, len(kvs))
    assert header["metadata"] == {
        "a.u8": 200, "a.i8": -100, "a.u16": 60000, "a.i16": -30000, "a.u32": 4_000_000_000,
        "a.i32": -2_000_000_000, "a.f32": 0.25, "a.bool": True, "a.str": "héllo", "a.u64": 2**40,
        "a.i64": -(2**40), "a.f64": 1e-300, "a.f32_tenth": 0.1, "a.ints": (1, -2, 3), "a.strs": ("x", "yz"),
        "a.nested": ((1, 2), ()), "a.bools": (True, False)}
    w, n, q = header["tensors"]
    assert (w.name, w.dims, w.ggml_type, w.offset, w.n_bytes) == ("w", (64, 32), T_F16, 0, 4096)
    assert (n.dims, n.offset, n.n_bytes) == ((64,), 4096, 256)
    assert (q.ggml_type, q.offset, q.n_bytes) == (T_Q4_K, 4352, 4 * 144)
    assert header["data_offset"] % 32 == 0 and header["data_offset"] > 0


def test_version_2_is_read(tmp_path):
    path = write_gguf(tmp_path / "v2.gguf", [("k", U32, 7)], [], version=2)
    header = read_gguf_header(path)
    assert header["version"] == 2 and header["metadata"] == {"k": 7}


def test_long_arrays_are_skipped_keeping_their_length(tmp_path):
    kvs = [("tokenizer.ggml.tokens", ARR, (STR, [f"t{i}" for i in range(5000)])),
           ("tokenizer.ggml.scores", ARR, (F32, [0.0] * 3000)),
           ("tokenizer.ggml.merges", ARR, (STR, ["a b"] * 2000)), ("after", STR, "still read")]
    header = read_gguf_header(write_gguf(tmp_path / "t.gguf", kvs, [("w", (8, 8), T_F32)]))
    meta = header["metadata"]
    assert meta["tokenizer.ggml.tokens"] == SkippedArray(STR, 5000)
    assert meta["tokenizer.ggml.scores"] == SkippedArray(F32, 3000)
    assert len(meta["tokenizer.ggml.merges"]) == 2000
    assert meta["after"] == "still read"
    assert header["tensors"][0].dims == (8, 8)
    small = read_gguf_header(tmp_path / "t.gguf", max_array_items=10_000)
    assert len(small["metadata"]["tokenizer.ggml.tokens"]) == 5000
    assert small["metadata"]["tokenizer.ggml.tokens"][4999] == "t4999"


def test_huge_array_is_skipped_without_reading_it_into_memory(tmp_path):
    n_items = 256 * 2**20
    path = tmp_path / "huge.gguf"
    with open(path, "wb") as handle:
        handle.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 2))
        handle.write(_string("blob") + struct.pack("<IIQ", ARR, U8, n_items))
        handle.seek(n_items, 1)  # a hole: the array's bytes
        handle.write(_kv("after", U32, 42))
    tracemalloc.start()
    try:
        header = read_gguf_header(path)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header["metadata"] == {"blob": SkippedArray(U8, n_items), "after": 42}
    assert peak_bytes < 16 * 2**20


# ---- bad files --------------------------------------------------------------------------------

def _one_line_spec_error(path, match: str) -> str:
    with pytest.raises(SpecError, match=match) as info:
        read_gguf_header(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    return str(info.value)


def test_bad_magic_and_empty_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    _one_line_spec_error(bad, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _one_line_spec_error(empty, "not a GGUF file")


def test_every_truncation_is_a_spec_error(tmp_path):
    header, total_bytes = gguf_bytes(llama_kvs(tokens=3), [("w", (4, 4), T_F32), ("b", (4,), T_F32)])
    full = header + bytes(total_bytes - len(header))
    path = tmp_path / "cut.gguf"
    path.write_bytes(full)
    assert read_gguf_header(path)["tensor_count"] == 2
    # every cut inside the header, and a few inside the tensor data
    for cut in [*range(len(header)), len(header), (len(header) + len(full)) // 2, len(full) - 1]:
        path.write_bytes(full[:cut])
        message = _one_line_spec_error(path, r"truncated GGUF file|not a GGUF file")
        if cut >= 4:
            assert "truncated" in message


def test_truncated_tensor_data_names_the_tensor(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", [("k", U32, 1)], [("a", (64,), T_F32), ("last", (64,), T_F32)])
    path.write_bytes(path.read_bytes()[:-1])
    _one_line_spec_error(path, r"tensor 'last' ends at byte \d+ but the file has \d+ bytes")


def test_unsupported_versions(tmp_path):
    v1 = write_gguf(tmp_path / "v1.gguf", [], [], version=1)
    _one_line_spec_error(v1, "GGUF version 1 is not supported")
    big_endian = tmp_path / "be.gguf"
    big_endian.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    _one_line_spec_error(big_endian, "big-endian")


def test_corrupt_counts_types_and_dims(tmp_path):
    absurd = tmp_path / "absurd.gguf"
    absurd.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**62))
    _one_line_spec_error(absurd, "truncated")
    bad_type = tmp_path / "type.gguf"
    bad_type.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + _string("k") + struct.pack("<IQ", 99, 0))
    _one_line_spec_error(bad_type, "metadata key 'k' has unknown value type 99")
    dims = tmp_path / "dims.gguf"
    info = _string("w") + struct.pack("<I", 9) + bytes(100)
    dims.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info)
    _one_line_spec_error(dims, "tensor info 'w' claims 9 dimensions")


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        read_gguf_header(tmp_path / "nope.gguf")
    with pytest.raises(SpecError, match="is a directory"):
        read_gguf_header(tmp_path)


# ---- ModelSpec --------------------------------------------------------------------------------

def test_llama_f16_spec(tmp_path):
    spec = spec_from_gguf(write_gguf(tmp_path / "tiny.gguf", llama_kvs(), llama_tensors(output=False)))
    assert (spec.name, spec.family, spec.layers, spec.hidden, spec.intermediate) == \
        ("tiny-llama", "llama", LAYERS, HIDDEN, FFN)
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.vocab) == (HEADS, KV_HEADS, HEAD_DIM, VOCAB)
    assert spec.tied_embeddings and not spec.attention_bias and spec.moe is None
    assert (spec.dtype, spec.quantization) == ("fp16", None)
    assert (spec.max_context, spec.rope_theta, spec.rms_eps) == (4096, 500000.0, 1e-5)  # f32 read as 1e-05
    assert spec.by_name["layers.1.self_attn.k_proj"].rows == KV_HEADS * HEAD_DIM


def test_untied_bf16_with_vocab_size_key_and_file_stem_name(tmp_path):
    kvs = [kv for kv in llama_kvs(**{"llama.vocab_size": (U32, 1234)}) if kv[0] != "general.name"]
    spec = spec_from_gguf(write_gguf(tmp_path / "my-model.gguf", kvs, llama_tensors(T_BF16)))
    assert not spec.tied_embeddings
    assert (spec.vocab, spec.dtype, spec.name) == (1234, "bf16", "my-model")


def test_vocab_from_embedding_when_tokens_are_absent(tmp_path):
    kvs = [kv for kv in llama_kvs() if kv[0] != "tokenizer.ggml.tokens"]
    assert spec_from_gguf(write_gguf(tmp_path / "m.gguf", kvs, llama_tensors())).vocab == VOCAB


@pytest.mark.parametrize("ggml_type, bits", [(T_Q4_0, 4), (T_Q4_K, 4), (T_Q5_K, 5), (T_Q6_K, 6), (T_Q8_0, 8),
                                             (T_Q3_K, 3), (T_Q2_K, 2)])
def test_quantized_spec_matches_file_bytes(tmp_path, ggml_type, bits):
    path = write_gguf(tmp_path / "q.gguf", llama_kvs(), llama_tensors(ggml_type))
    spec = spec_from_gguf(path)
    assert spec.dtype == "fp16"
    q = spec.quantization
    assert (q.bits, q.group_size, q.symmetric) == (bits, 32, True)
    file_bytes = sum(t.n_bytes for t in read_gguf_header(path)["tensors"]
                     if t.name.startswith("blk.") and len(t.dims) == 2)
    spec_bytes = sum(t.n_bytes for layer in range(LAYERS) for t in spec.layer_tensors(layer))
    assert spec_bytes == file_bytes  # each kind at the bits its tensors are stored with


def test_mixed_quantization_averages_bits_per_weight(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", llama_kvs(), llama_tensors(T_Q4_K, down_type=T_Q6_K))
    tensors = read_gguf_header(path)["tensors"]
    dtype, quantization, bits_per_weight = weight_format(tensors)
    per_layer = {"q": HIDDEN * HEADS * HEAD_DIM, "kv": 2 * HIDDEN * KV_HEADS * HEAD_DIM,
                 "o": HEADS * HEAD_DIM * HIDDEN, "gate_up": 2 * HIDDEN * FFN, "down": FFN * HIDDEN}
    q6 = per_layer["down"]
    expected = (4.5 * (sum(per_layer.values()) - q6) + 6.5625 * q6) / sum(per_layer.values())
    assert bits_per_weight == pytest.approx(expected)
    assert (dtype, quantization.bits) == ("fp16", 4)
    assert spec_from_gguf(path).quantization == quantization


def test_quantization_for_bits():
    assert [quantization_for_bits(b).bits for b in (4.5, 5.5, 6.5625, 8.5, 3.4375, 1.5625, 16.0)] == \
        [4, 5, 6, 8, 3, 2, 8]
    assert GGML_TYPES[T_Q4_0].bits_per_weight == 4.5 and GGML_TYPES[T_Q6_K].bits_per_weight == 6.5625


def test_qwen2_with_attention_bias(tmp_path):
    kvs = llama_kvs("qwen2", **{"qwen2.vocab_size": (U32, VOCAB)})
    spec = spec_from_gguf(write_gguf(tmp_path / "q.gguf", kvs, llama_tensors(T_F32, bias=True)))
    assert (spec.family, spec.attention_bias, spec.dtype) == ("qwen2", True, "fp32")


def test_llama_moe_is_mixtral(tmp_path):
    kvs = llama_kvs(**{"llama.expert_count": (U32, 4), "llama.expert_used_count": (U32, 2)})
    spec = spec_from_gguf(write_gguf(tmp_path / "moe.gguf", kvs, llama_tensors(experts=4)))
    assert spec.family == "mixtral"
    assert (spec.moe.experts, spec.moe.active, spec.moe.expert_intermediate) == (4, 2, FFN)
    bank = spec.by_name["layers.0.mlp.experts"]
    assert (bank.experts, bank.route_prob, bank.params) == (4, 0.5, 4 * 3 * FFN * HIDDEN)


def test_linear_rope_scaling(tmp_path):
    kvs = llama_kvs(**{"llama.rope.scaling.type": (STR, "linear"), "llama.rope.scaling.factor": (F32, 4.0)})
    spec = spec_from_gguf(write_gguf(tmp_path / "r.gguf", kvs, llama_tensors()))
    assert (spec.rope_scaling.kind, spec.rope_scaling.factor) == ("linear", 4.0)


@pytest.mark.parametrize("kvs, match", [
    ([("general.architecture", STR, "gpt2")], r"general\.architecture 'gpt2' is not supported"),
    ([kv for kv in llama_kvs() if kv[0] != "llama.block_count"], r"'llama\.block_count' is missing"),
    ([kv for kv in llama_kvs() if kv[0] != "llama.attention.head_count_kv"]
     + [("llama.attention.head_count_kv", ARR, (U32, [2, 2]))], r"head_count_kv' holds 2 per-layer values"),
    ([kv for kv in llama_kvs() if kv[0] != "llama.attention.head_count"]
     + [("llama.attention.head_count", U32, 3)], r"heads: 3 does not divide hidden 256"),
    ([kv for kv in llama_kvs() if kv[0] != "llama.embedding_length"]
     + [("llama.embedding_length", F32, 256.0)], r"'llama\.embedding_length' must be a number"),
])
def test_spec_errors_name_the_key(tmp_path, kvs, match):
    path = write_gguf(tmp_path / "bad.gguf", kvs, llama_tensors())
    with pytest.raises(SpecError, match=match) as info:
        spec_from_gguf(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_spec_needs_block_weight_matrices(tmp_path):
    path = write_gguf(tmp_path / "vocab-only.gguf", llama_kvs(), [])
    with pytest.raises(SpecError, match=r"no blk\.\*\.weight matrices"):
        spec_from_gguf(path)


def test_file_size_counts_each_tensor_at_its_header_type(tmp_path):
    """A Q4_K_M-style file: Q4_K body and embedding, Q6_K output and ffn_down. Every matrix
    counts at its own type (norms, F32 in the file, are counted in the model dtype)."""
    tensors = [(name, dims, T_Q6_K if name == "output.weight" else t)
               for name, dims, t in llama_tensors(T_Q4_K, down_type=T_Q6_K)]
    path = write_gguf(tmp_path / "m.gguf", llama_kvs(), tensors)
    spec = spec_from_gguf(path)
    infos = read_gguf_header(path)["tensors"]
    matrices = [t for t in infos if len(t.dims) == 2]
    assert spec.weight_bytes - spec.norm_bytes == sum(t.n_bytes for t in matrices)
    assert spec.by_name["lm_head"].n_bytes == HIDDEN * VOCAB * 6.5625 / 8
    assert spec.by_name["embed_tokens"].n_bytes == HIDDEN * VOCAB * 4.5 / 8
    assert spec.params == sum(t.n_elements for t in matrices)


def test_tied_embedding_is_one_tensor_and_counted_once(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", llama_kvs(), llama_tensors(T_Q8_0, output=False))
    spec = spec_from_gguf(path)
    assert spec.tied_embeddings and spec.by_name["embed_tokens"].n_bytes == 0
    assert spec.by_name["lm_head"].n_bytes == HIDDEN * VOCAB * 8.5 / 8  # the embedding's own Q8_0
    matrices = [t for t in read_gguf_header(path)["tensors"] if len(t.dims) == 2]
    assert spec.params == sum(t.n_elements for t in matrices)
