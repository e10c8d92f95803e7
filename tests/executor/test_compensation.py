"""Quantized weights and low-rank residual compensation: numerics, rank tables, the branch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from executor.compensation import (CompensatedLinear, calibration_second_moment,
                                   factors_from_svd, rank_error_table,
                                   relative_output_error_table, residual_factors, residual_svd)
from executor.quant import (QuantLinear, dequantize, pack_int4, quant_linear_from, quantize,
                            unpack_int4, unpacked_codes)
from planner.errors import PlanError, SpecError

THREAD_PREFIX = "offplan-compensation"


def _worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture(autouse=True)
def no_leaked_workers():
    yield
    assert _worker_threads() == []


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(out_f: int, in_f: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=_gen(seed), dtype=torch.float64) * 0.05
    w[0, 3] = 0.4  # an outlier, as real checkpoints have
    return w.to(dtype)


def _correlated_inputs(n: int, in_f: int, seed: int, low_rank: int = 4,
                       noise: float = 0.02) -> torch.Tensor:
    """[n, in] rows whose covariance is dominated by a fixed rank-`low_rank` subspace."""
    basis = torch.randn(low_rank, in_f, generator=_gen(1234), dtype=torch.float64)  # [k, in]
    g = _gen(seed)
    z = torch.randn(n, low_rank, generator=g, dtype=torch.float64)  # [n, k]
    return z @ basis + noise * torch.randn(n, in_f, generator=g, dtype=torch.float64)


def _measured_error_energy(x: torch.Tensor, err_t: torch.Tensor, a: torch.Tensor,
                           b: torch.Tensor) -> float:
    """Mean over rows of ‖x (E.T - A B)‖²; x [n, in], err_t [in, out]."""
    return float(((x @ (err_t - a.to(x.dtype) @ b.to(x.dtype))) ** 2).sum(dim=1).mean())


# ---------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_trip_error_is_at_most_half_a_step(bits, symmetric):
    w = _weight(16, 64)
    qt = quantize(w, bits=bits, group_size=16, symmetric=symmetric)
    assert qt.data.dtype == torch.uint8
    assert tuple(qt.data.shape) == ((16, 32) if bits == 4 else (16, 64))
    assert qt.scales.dtype == torch.bfloat16 and tuple(qt.scales.shape) == (16, 4)
    assert (qt.zeros is None) == symmetric
    step = qt.scales.float().repeat_interleave(16, dim=1)  # [out, in]
    err = (w - dequantize(qt, torch.float32)).abs()
    assert bool((err <= step / 2 * (1 + 1e-6)).all())
    assert float(err.max()) > 0  # lossy, so the bound is not vacuous
    codes = unpacked_codes(qt)
    assert int(codes.max()) <= 2 ** bits - 1


def test_int8_is_finer_than_int4():
    w = _weight(8, 32)
    err = {b: float((w - dequantize(quantize(w, b, 8))).norm()) for b in (4, 8)}
    assert err[8] < err[4] / 8


def test_int4_packing_round_trips_codes_exactly():
    codes = torch.randint(0, 16, (5, 7), generator=_gen(3), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert tuple(packed.shape) == (5, 4)
    assert torch.equal(unpack_int4(packed, 7), codes)
    assert pack_int4(torch.tensor([[1, 2]], dtype=torch.uint8)).item() == 0x21


def test_quantized_tensor_bytes_match_layout():
    qt = quantize(_weight(8, 32), bits=4, group_size=16, symmetric=False)
    assert qt.nbytes == 8 * 16 + 8 * 2 * 2 + 8 * 2 * 2  # codes + bf16 scales + bf16 offsets


@pytest.mark.parametrize("kwargs, field", [
    (dict(bits=4, group_size=3), "group_size"),
    (dict(bits=4, group_size=-1), "group_size"),
    (dict(bits=3, group_size=5), "bits"),
])
def test_bad_quantization_parameters_raise_spec_error(kwargs, field):
    with pytest.raises(SpecError, match=field):
        quantize(_weight(4, 10), **kwargs)


@pytest.mark.parametrize("cache", [False, True])
def test_quant_linear_matches_dequantized_matmul(cache):
    lin = nn.Linear(32, 12)
    ql = quant_linear_from(lin, bits=4, group_size=8, cache_dequantized=cache)
    assert (ql.weight_cache is not None) == cache
    x = torch.randn(3, 5, 32, generator=_gen(7))  # [batch, tokens, in]
    expected = x @ dequantize(ql.quantized()).T + lin.bias.detach()
    torch.testing.assert_close(ql(x), expected)


# ---------------------------------------------------------------- factors and tables


def test_calibration_second_moment_is_mean_outer_product():
    xs = [torch.randn(2, 3, 6, generator=_gen(1)), torch.randn(4, 6, generator=_gen(2))]
    rows = torch.cat([x.reshape(-1, 6) for x in xs]).double()  # [10, 6]
    c = calibration_second_moment(xs)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c, rows.T @ rows / 10)
    with pytest.raises(SpecError):
        calibration_second_moment([])


@pytest.mark.parametrize("deficient", [False, True])
def test_activation_aware_expected_error_equals_tail_energy(deficient):
    w = _weight(12, 20, dtype=torch.float64)
    qt = quantize(w, bits=4, group_size=5)
    x = _correlated_inputs(300, 20, seed=5, low_rank=6, noise=0.0 if deficient else 0.1)
    c = calibration_second_moment([x])
    svd = residual_svd(w, qt, c)
    err_t = (w - dequantize(qt, torch.float64)).T  # [in, out]
    total = svd.tail_energy(0)
    assert total == pytest.approx(_measured_error_energy(x, err_t, *factors_from_svd(
        svd, 0, torch.float64)), rel=1e-8)
    for r in range(0, svd.max_rank + 1):
        a, b = factors_from_svd(svd, r, torch.float64)
        measured = _measured_error_energy(x, err_t, a, b)
        assert measured == pytest.approx(svd.tail_energy(r), rel=1e-6, abs=1e-8 * total)


def test_table_predicts_error_on_fresh_inputs():
    w = _weight(24, 32)
    qt = quantize(w, bits=4, group_size=8)
    calib = _correlated_inputs(40_000, 32, seed=11, low_rank=8, noise=0.3)
    fresh = _correlated_inputs(40_000, 32, seed=12, low_rank=8, noise=0.3)
    c = calibration_second_moment([calib])
    ranks = [0, 2, 4, 8, 12]
    table = rank_error_table(w, qt, ranks, c)
    rel_table = relative_output_error_table(w, qt, ranks, c)
    err_t = (w.double() - dequantize(qt, torch.float64)).T  # [in, out]
    base = _measured_error_energy(fresh, err_t, *residual_factors(w, qt, 0, c))
    out_energy = float(((fresh @ w.double().T) ** 2).sum(dim=1).mean())
    for r in ranks:
        measured = _measured_error_energy(fresh, err_t, *residual_factors(w, qt, r, c))
        assert measured / base == pytest.approx(table[r], rel=0.04)
        assert (measured / out_energy) ** 0.5 == pytest.approx(rel_table[r], rel=0.02)


def test_activation_aware_beats_plain_svd_on_correlated_inputs():
    w = _weight(24, 32)
    qt = quantize(w, bits=4, group_size=8)
    c = calibration_second_moment([_correlated_inputs(4000, 32, seed=21)])
    fresh = _correlated_inputs(4000, 32, seed=22)
    err_t = (w.double() - dequantize(qt, torch.float64)).T  # [in, out]
    rank = 4
    aware = _measured_error_energy(fresh, err_t, *residual_factors(w, qt, rank, c))
    plain = _measured_error_energy(fresh, err_t, *residual_factors(w, qt, rank))
    base = _measured_error_energy(fresh, err_t, *residual_factors(w, qt, 0))
    assert aware < 0.1 * base
    assert aware < 0.2 * plain


@pytest.mark.parametrize("aware", [False, True])
def test_error_tables_are_monotone_in_rank(aware):
    w = _weight(10, 16)
    qt = quantize(w, bits=4, group_size=4, symmetric=False)
    c = calibration_second_moment([_correlated_inputs(500, 16, seed=3)]) if aware else None
    ranks = list(range(0, 11))
    for table in (rank_error_table(w, qt, ranks, c), relative_output_error_table(w, qt, ranks, c)):
        values = [table[r] for r in ranks]
        assert all(later <= earlier + 1e-12 for earlier, later in zip(values, values[1:]))
        assert values[-1] < 1e-6 * max(values[0], 1e-30) + 1e-9
    fractions = rank_error_table(w, qt, ranks, c)
    assert fractions[0] == 1.0 and fractions[5] < 1.0


def test_plain_table_is_frobenius_tail_of_the_error():
    w = _weight(10, 16, dtype=torch.float64)
    qt = quantize(w, bits=4, group_size=4)
    sigma = torch.linalg.svdvals(w - dequantize(qt, torch.float64))
    table = rank_error_table(w, qt, [3])
    assert table[3] == pytest.approx(float((sigma[3:] ** 2).sum() / (sigma ** 2).sum()))


def test_rank_out_of_range_and_bad_moment_raise():
    w = _weight(6, 8)
    qt = quantize(w, bits=8, group_size=4)
    with pytest.raises(PlanError, match="rank 7"):
        residual_factors(w, qt, 7)
    with pytest.raises(SpecError, match="act_second_moment"):
        rank_error_table(w, qt, [1], torch.eye(5))
    with pytest.raises(SpecError, match="act_second_moment"):
        residual_factors(w, qt, 1, torch.zeros(8, 8))


# ---------------------------------------------------------------- CompensatedLinear


def test_rank_zero_is_plain_quant_linear_and_starts_no_thread():
    lin = nn.Linear(32, 16)
    x = torch.randn(4, 32, generator=_gen(4))
    with CompensatedLinear.from_linear(lin, rank=0, bits=4, group_size=8) as comp:
        assert comp.rank == 0
        torch.testing.assert_close(comp(x), comp.quant(x), rtol=0, atol=0)
        assert comp.calls == 0 and _worker_threads() == []


@pytest.mark.parametrize("aware", [False, True])
def test_full_rank_recovers_float_linear(aware):
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    x = torch.randn(2, 3, 24, generator=_gen(9))  # [batch, tokens, in]
    c = calibration_second_moment([torch.randn(200, 24, generator=_gen(10))]) if aware else None
    with CompensatedLinear.from_linear(lin, rank=16, bits=4, group_size=8,
                                       act_second_moment=c) as comp:
        y = comp(x)
        quant_gap = float((comp.quant(x) - lin(x)).detach().abs().max())
    assert quant_gap > 1e-3  # the backbone alone is visibly off
    torch.testing.assert_close(y, lin(x).detach(), atol=1e-5, rtol=1e-5)


def test_timers_count_and_reset_and_close_ends_worker():
    lin = nn.Linear(16, 8)
    comp = CompensatedLinear.from_linear(lin, rank=4, bits=4, group_size=4)
    x = torch.randn(5, 16, generator=_gen(2))
    expected = comp.quant(x) + (x @ comp.a) @ comp.b
    torch.testing.assert_close(comp(x), expected)
    comp(x)
    assert comp.calls == 2 and comp.host_branch_s > 0 and comp.wait_s >= 0
    assert len(_worker_threads()) == 1
    comp.reset_timers()
    assert (comp.calls, comp.host_branch_s, comp.wait_s) == (0, 0.0, 0.0)
    comp.close()
    assert _worker_threads() == []


def test_shared_pool_is_left_to_its_owner():
    lin = nn.Linear(16, 8)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_PREFIX) as pool:
        layers = [CompensatedLinear.from_linear(lin, rank=2, bits=8, group_size=8, pool=pool)
                  for _ in range(2)]
        x = torch.randn(3, 16, generator=_gen(8))
        outs = [layer(x) for layer in layers]
        for layer in layers:
            layer.close()
        torch.testing.assert_close(outs[0], outs[1])
        assert pool.submit(lambda: 42).result() == 42  # still running after close()


def test_mismatched_factors_raise_plan_error():
    ql = QuantLinear(quantize(_weight(8, 16), bits=4, group_size=4))
    with pytest.raises(PlanError, match="factors"):
        CompensatedLinear(ql, torch.zeros(16, 3), torch.zeros(2, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backbone_matches_cpu_loopback():
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 64, generator=_gen(6))
    with CompensatedLinear.from_linear(lin, rank=8, bits=4, group_size=16) as cpu_comp, \
            CompensatedLinear.from_linear(lin, rank=8, bits=4, group_size=16,
                                          device="cuda") as cuda_comp:
        expected = cpu_comp(x)
        got = cuda_comp(x.cuda()).cpu()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
