"""Strict conversion between frozen dataclasses and plain YAML data.

One place for the rules every file format shares: unknown keys are rejected, missing
required fields are named, numbers must be positive where the field is a size or a rate,
fields ending in `_bytes` accept sizes such as '24GiB'. Errors name the dotted field path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from planner.errors import OffplanError
from planner.units import parse_bytes

T = TypeVar("T")

# Numbers are never negative; these must also be non-zero (a zero would divide or mean nothing).
_POSITIVE_FIELDS = {"memory_bytes", "mem_bw_gbps", "h2d_gbps", "d2h_gbps", "cores", "bits",
                    "experts", "active", "expert_intermediate", "factor", "batch", "prompt", "gen",
                    "layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "max_context"}


def _fail(error: type[OffplanError], path: str, message: str) -> OffplanError:
    return error(f"{path}: {message}" if path else message)


def from_dict(cls: type[T], data: Any, path: str = "", error: type[OffplanError] = OffplanError) -> T:
    """Build dataclass `cls` from mapping `data`, recursively, rejecting unknown keys."""
    if not isinstance(data, dict):
        raise _fail(error, path, f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise _fail(error, "", f"unknown key {where}{unknown[0]!r}; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(error, sub, "missing (required)")
            continue
        kwargs[name] = _convert(hints[name], data[name], sub, error)
    try:
        return cls(**kwargs)
    except OffplanError:
        raise
    except (TypeError, ValueError) as exc:
        raise _fail(error, path, str(exc)) from None


def _convert(tp: Any, value: Any, path: str, error: type[OffplanError]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, error)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, error)
    if tp is Any:
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(error, path, f"expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{path}[{i}]", error) for i, v in enumerate(value))
        if origin is tuple:
            if len(value) != len(args):
                raise _fail(error, path, f"expected {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, f"{path}[{i}]", error) for i, (a, v) in enumerate(zip(args, value)))
        return [_convert(args[0], v, f"{path}[{i}]", error) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(error, path, f"expected a mapping, got {value!r}")
        if not args:
            return dict(value)
        return {_key(args[0], k, path, error): _convert(args[1], v, f"{path}.{k}", error) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(error, path, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _fail(error, path, f"expected text, got {value!r}")
        return str(value)
    if tp in (int, float):
        return _number(tp, value, path, error)
    raise _fail(error, path, f"unsupported type {tp!r}")  # a schema bug, not user input


def _key(tp: Any, key: Any, path: str, error: type[OffplanError]) -> Any:
    """Mapping keys: int keys (ranks) survive a YAML round trip whether written as 8 or '8'."""
    if tp is int:
        try:
            return int(key)
        except (TypeError, ValueError):
            raise _fail(error, path, f"key {key!r} is not a whole number") from None
    return str(key)


def _number(tp: type, value: Any, path: str, error: type[OffplanError]) -> float | int:
    leaf = path.rsplit(".", 1)[-1].split("[")[0]
    if leaf.endswith("_bytes") and isinstance(value, str):
        try:
            return parse_bytes(value, path)
        except OffplanError as exc:
            raise error(str(exc)) from None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _fail(error, path, f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(error, path, f"expected a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
        raise _fail(error, path, f"expected a finite number, got {value!r}")
    must_be_positive = leaf in _POSITIVE_FIELDS or ".flops_tflops." in path
    if value < 0 or (value == 0 and must_be_positive):
        raise _fail(error, path, f"must be positive, got {value!r}")
    if tp is int:
        if float(value) != int(value):
            raise _fail(error, path, f"expected a whole number, got {value!r}")
        return int(value)
    return float(value)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain data (dicts, lists, numbers, strings) for YAML/JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def stable_hash(obj: Any) -> str:
    """Short content hash of a dataclass tree, independent of dict order."""
    text = yaml.safe_dump(to_dict(obj), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def read_yaml(path: str | Path, error: type[OffplanError] = OffplanError) -> Any:
    p = Path(path)
    if not p.exists():
        raise error(f"{p}: file not found")
    if p.is_dir():
        raise error(f"{p}: is a directory, expected a file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise error(f"{p}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise error(f"{p}: not a text file") from None


def atomic_write(path: str | Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename: never half-written. The file
    gets the permissions any new file gets here (0666 less the umask), not mkstemp's 0600."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    except OSError as exc:  # name the user's path, never a temporary one
        raise OSError(exc.errno, exc.strerror, str(p)) from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, p)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(p)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_file_mode() -> int:
    """0666 less the process's umask: the mode `open()` would give a new file. (Reading the
    umask means setting it, so it is set straight back.)"""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def check_version(data: Any, path: str, supported: int, error: type[OffplanError]) -> dict:
    """Pop and check the `version:` key every offplan file carries."""
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level")
    data = dict(data)
    version = data.pop("version", None)
    if version is None:
        raise error(f"{path}: missing 'version: {supported}' at the top")
    if version != supported:
        raise error(f"{path}: version {version!r} is not supported (expected {supported})")
    return data

