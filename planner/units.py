"""Parsing and printing of sizes and rates. Internally: bytes, seconds, GB/s (1e9 bytes/s)."""

from __future__ import annotations

import math
import re

from planner.errors import OffplanError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

GIB = 2**30
MAX_BYTES = 2**60  # 1 EiB: no memory size or file offplan handles comes near it


def parse_bytes(value: object, field: str = "size") -> int:
    """'24GiB', '10 GB', '512M', 1073741824 -> bytes. Raises OffplanError naming `field`."""
    if isinstance(value, bool):
        raise OffplanError(f"{field}: expected a size such as '24GiB', got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise OffplanError(f"{field}: cannot read size {value!r}; write it like '24GiB' or '16GB'")
        number, unit = float(match.group(1)), match.group(2).lower()
    else:
        raise OffplanError(f"{field}: expected a size such as '24GiB', got {value!r}")
    size = number * _SIZE_UNITS[unit]
    if size != size or size <= 0:
        raise OffplanError(f"{field}: must be positive, got {value!r}")
    if size > MAX_BYTES:
        raise OffplanError(f"{field}: {value!r} is beyond any machine (more than 1 EiB)")
    return int(round(size))


def check_positive(value: float, field: str) -> float:
    """A finite number above zero (bandwidths, rates), or OffplanError naming `field`."""
    if not math.isfinite(value) or value <= 0:
        raise OffplanError(f"{field}: must be a positive finite number, got {value:g}")
    return value


def check_seconds(value: float, field: str) -> float:
    """A finite duration of zero or more seconds, or OffplanError naming `field`."""
    if not math.isfinite(value) or value < 0:
        raise OffplanError(f"{field}: must be a finite number of seconds, 0 or more, got {value:g}")
    return value


def check_count(value: int, field: str) -> int:
    """A whole number of at least 1 (threads, tokens), or OffplanError naming `field`."""
    if value < 1:
        raise OffplanError(f"{field}: must be a positive whole number, got {value}")
    return value


def fmt_bytes(n_bytes: float) -> str:
    """Bytes -> '41.2 GiB' (binary units, one decimal)."""
    n = float(n_bytes)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_sig(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits as a plain decimal, never in exponent form:
    680.4 -> '680', 0.0006721 -> '0.000672', 1.10 -> '1.1'; 123456 -> '123,000' at 3 digits."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    if decimals <= 0:
        return f"{round(value, decimals):,.0f}"
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".")


def fmt_seconds(t_s: float) -> str:
    """Seconds -> '12.3 ms' / '1.42 s' / '3 min 5 s'."""
    if t_s < 1e-3:
        return f"{t_s * 1e6:.0f} µs"
    if t_s < 1:
        return f"{t_s * 1e3:.1f} ms"
    if t_s < 120:
        return f"{t_s:.2f} s"
    return f"{int(t_s // 60)} min {int(t_s % 60)} s"


def error_pct(predicted: float, measured: float) -> float | None:
    """Signed error of a prediction relative to its measurement, in percent; None when
    nothing was measured."""
    return 100.0 * (predicted - measured) / measured if measured else None
