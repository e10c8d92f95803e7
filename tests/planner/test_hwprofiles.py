"""Shipped datasheet profiles: they load, are physically sane, cite every figure, round-trip,
and malformed profiles fail with one line naming the field."""

from __future__ import annotations

from importlib import resources

import pytest
import yaml

from planner.errors import HardwareError
from planner.hardware.profile import (
    curve_gbps,
    load_profile,
    profile_from_data,
    profile_to_yaml,
    shipped_profile_names,
)

GIB = 2**30
# name -> (PCIe generation, lanes) of the card itself
PCIE = {"rtx3060": (4, 16), "rtx4060ti-16g": (4, 8), "rtx4090": (4, 16), "rtx5090": (5, 16),
        "t4": (3, 16), "l4": (4, 16), "a100-40g-pcie": (4, 16), "h100-pcie": (5, 16),
        "rtx3070": (4, 16), "rtx3080": (4, 16), "rtx3090": (4, 16), "rtx3090ti": (4, 16), "rtx4070": (4, 16),
        "rtx4070tis": (4, 16), "rtx4080": (4, 16), "rtx5060ti-16g": (5, 8), "rtx5070ti": (5, 16),
        "rtx5080": (5, 16), "a4000": (4, 16), "a5000": (4, 16), "a6000": (4, 16), "rtx6000-ada": (4, 16),
        "rtx-pro-6000": (5, 16), "l40s": (4, 16), "v100": (3, 16), "a10": (4, 16), "a100-80g-pcie": (4, 16),
        "a100-80g-sxm": (4, 16), "h100-sxm": (5, 16), "h200": (5, 16)}
SHIPPED = tuple(PCIE)
# GB/s per lane per direction after 128b/130b encoding
PCIE_LANE_GBPS = {3: 8 * 128 / 130 / 8, 4: 16 * 128 / 130 / 8, 5: 32 * 128 / 130 / 8}
REQUIRED_CITATIONS = ("accelerator.memory_bytes", "accelerator.mem_bw_gbps", "accelerator.flops_tflops",
                      "link.h2d_gbps", "host.mem_bw_gbps")
CURVES = ("h2d_curve", "d2h_curve", "h2d_pageable_curve", "d2h_pageable_curve")


def _raw(name: str) -> dict:
    return yaml.safe_load((resources.files("hwprofiles") / f"{name}.yaml").read_text())


def _numeric_paths(data: object, prefix: str = "") -> list[str]:
    """Dotted paths of every number (or size string, or curve) in raw profile data."""
    if isinstance(data, dict):
        paths = []
        for key, value in data.items():
            if prefix == "" and key in ("version", "source"):
                continue
            paths += _numeric_paths(value, f"{prefix}.{key}" if prefix else str(key))
        return paths
    if isinstance(data, list) or (isinstance(data, (int, float)) and not isinstance(data, bool)):
        return [prefix]
    if isinstance(data, str) and prefix.endswith("_bytes"):
        return [prefix]
    return []


def test_shipped_profile_names_lists_all_datasheet_profiles():
    names = shipped_profile_names()
    missing = sorted(set(SHIPPED) - set(names))
    assert not missing, f"not shipped: {missing}"


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_loads_and_is_a_datasheet_profile(name):
    p = load_profile(name)
    assert p.source.kind == "datasheet"
    assert p.source.date == "2026-11-21"
    assert p.source.notes
    assert not p.is_measured
    assert not p.accelerator.loopback


@pytest.mark.parametrize("name", SHIPPED)
def test_figures_are_physically_sane(name):
    p = load_profile(name)
    acc, link, host = p.accelerator, p.link, p.host
    assert 4 * GIB <= acc.memory_bytes <= 200 * GIB
    assert 0.5 * GIB <= p.reserve_bytes <= 3 * GIB
    assert 0 < p.vram_usable_bytes < acc.memory_bytes
    assert 100 <= acc.mem_bw_gbps <= 5000
    assert set(acc.flops_tflops) <= {"bf16", "fp16", "fp32"} and "fp32" in acc.flops_tflops
    assert 1 <= acc.flops_tflops["fp32"] <= 200
    # tensor-core half precision is never slower than plain fp32, and stays below 1 PFLOP dense
    for dtype in ("bf16", "fp16"):
        if dtype in acc.flops_tflops:
            assert acc.flops_tflops["fp32"] <= acc.flops_tflops[dtype] <= 1000
    assert 0.75 <= acc.gemv_efficiency <= 0.85
    assert 0.6 <= acc.matmul_efficiency <= 0.75
    assert 5 <= link.h2d_gbps <= 70 and 5 <= link.d2h_gbps <= 70
    assert 1e-6 <= link.latency_s <= 1e-4
    assert 10 <= host.mem_bw_gbps <= 1000
    assert 4 <= host.cores <= 128
    assert 32 * GIB <= host.memory_bytes <= 4096 * GIB
    assert 2 * GIB <= p.host_reserve_bytes <= 32 * GIB
    assert 0.1 <= host.flops_tflops["fp32"] <= 20
    assert p.price_usd > 100
    # a GPU's memory is faster than its host's DRAM, and the link is slower than both
    assert host.mem_bw_gbps < acc.mem_bw_gbps
    assert link.h2d_gbps < host.mem_bw_gbps


@pytest.mark.parametrize("name", SHIPPED)
def test_link_matches_the_cards_pcie_generation_and_width(name):
    p = load_profile(name)
    generation, width = PCIE[name]
    assert (p.accelerator.pcie_generation, p.accelerator.pcie_width) == (generation, width)
    theoretical_gbps = PCIE_LANE_GBPS[generation] * width
    assert 0.7 * theoretical_gbps <= p.link.h2d_gbps <= 0.9 * theoretical_gbps
    assert 0.7 * theoretical_gbps <= p.link.d2h_gbps <= 0.9 * theoretical_gbps


@pytest.mark.parametrize("name", SHIPPED)
def test_link_curves_cover_64k_to_1g_and_rise_with_size(name):
    link = load_profile(name).link
    for curve_name in CURVES:
        curve = getattr(link, curve_name)
        sizes = [size for size, _ in curve]
        assert sizes == sorted(sizes) and sizes[0] <= 64 * 2**10 and sizes[-1] >= 2**30, curve_name
        rates = [gbps for _, gbps in curve]
        assert rates == sorted(rates), f"{curve_name} must not fall with size"
        assert rates[-1] <= max(link.h2d_gbps, link.d2h_gbps) * 1.001
    for size in (64 * 2**10, 2**20, 64 * 2**20, 2**30):
        pinned = curve_gbps(link.h2d_curve, size, link.h2d_gbps)
        pageable = curve_gbps(link.h2d_pageable_curve, size, link.h2d_gbps)
        assert pageable < pinned
    large_ratio = curve_gbps(link.h2d_pageable_curve, 2**30, 1) / curve_gbps(link.h2d_curve, 2**30, 1)
    assert 0.6 <= large_ratio <= 0.7
    # small copies are slower than large ones (beyond the fixed latency)
    assert curve_gbps(link.h2d_curve, 64 * 2**10, 1) < 0.9 * link.h2d_gbps


@pytest.mark.parametrize("name", SHIPPED)
def test_required_figures_carry_a_citation(name):
    citations = load_profile(name).source.citations
    for path in REQUIRED_CITATIONS:
        assert citations.get(path, "").strip(), f"{name}: no citation for {path}"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_number_carries_a_citation(name):
    citations = load_profile(name).source.citations
    for path in _numeric_paths(_raw(name)):
        covered = [key for key in citations if path == key or path.startswith(key + ".")]
        assert covered, f"{name}: {path} has no entry in source.citations"


@pytest.mark.parametrize("name", SHIPPED)
def test_citations_name_real_fields(name):
    numeric = set(_numeric_paths(_raw(name)))
    for key in load_profile(name).source.citations:
        assert any(path == key or path.startswith(key + ".") for path in numeric), \
            f"{name}: citation {key!r} names no figure in the profile"


@pytest.mark.parametrize("name", SHIPPED)
def test_round_trip_through_yaml(name):
    p = load_profile(name)
    again = profile_from_data(yaml.safe_load(profile_to_yaml(p)))
    assert again == p
    assert again.digest == p.digest


# ---- malformed profiles ---------------------------------------------------------------------

def _write(tmp_path, data: dict | str):
    path = tmp_path / "bad.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_valid_copy_loads_from_a_path(tmp_path):
    path = _write(tmp_path, _raw("rtx4090"))
    assert load_profile(str(path)) == load_profile("rtx4090")


def test_missing_field_is_named(tmp_path):
    data = _raw("rtx4090")
    del data["accelerator"]["mem_bw_gbps"]
    with pytest.raises(HardwareError, match=r"accelerator\.mem_bw_gbps: missing"):
        load_profile(str(_write(tmp_path, data)))


def test_negative_bandwidth_is_named(tmp_path):
    data = _raw("rtx4090")
    data["link"]["h2d_gbps"] = -25.0
    with pytest.raises(HardwareError, match=r"link\.h2d_gbps: must be positive"):
        load_profile(str(_write(tmp_path, data)))


def test_unknown_key_is_named(tmp_path):
    data = _raw("rtx4090")
    data["accelerator"]["vram_gb"] = 24
    with pytest.raises(HardwareError, match=r"unknown key accelerator\.'vram_gb'"):
        load_profile(str(_write(tmp_path, data)))


def test_malformed_yaml_is_reported_with_its_line(tmp_path):
    path = _write(tmp_path, "version: 1\naccelerator: {name: x, memory_bytes: [1,\n")
    with pytest.raises(HardwareError, match=r"bad\.yaml: malformed YAML \(line \d+"):
        load_profile(str(path))


def test_zero_memory_is_named(tmp_path):
    data = _raw("rtx4090")
    data["accelerator"]["memory_bytes"] = 0
    with pytest.raises(HardwareError, match=r"accelerator\.memory_bytes"):
        load_profile(str(_write(tmp_path, data)))


def test_negative_curve_point_is_named(tmp_path):
    data = _raw("rtx4090")
    data["link"]["h2d_curve"][0][1] = -1.0
    with pytest.raises(HardwareError, match=r"link\.h2d_curve"):
        load_profile(str(_write(tmp_path, data)))


def test_errors_are_one_line(tmp_path):
    data = _raw("rtx4090")
    del data["host"]["cores"]
    with pytest.raises(HardwareError) as info:
        load_profile(str(_write(tmp_path, data)))
    assert "\n" not in str(info.value) and "host.cores" in str(info.value)
