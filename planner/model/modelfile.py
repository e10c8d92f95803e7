"""Read what the user wants to run: our model.yaml, a Hugging Face config.json (or its
directory), a GGUF file's header, or a preset name. Returns a ModelFile: the ModelSpec plus
the optional workload defaults and draft candidates the file carries."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from planner.errors import SpecError
from planner.model.presets import preset
from planner.schema import check_version, from_dict, read_yaml
from planner.model.spec import ModelSpec, Quantization, Workload

MODEL_VERSION = 1


@dataclass(frozen=True)
class DraftCandidate:
    name: str
    spec: ModelSpec
    acceptance: float | None  # None = measure it with the executor (`acceptance: measure`)


@dataclass(frozen=True)
class Compensation:
    """Residual compensation for a quantized backbone (HCInfer): rank options per matrix and
    the recovered error fraction per rank, by tensor kind (from `offplan sensitivity`)."""

    ranks: tuple[int, ...] = (0, 8, 16, 32, 64, 128)
    table: dict[str, dict[int, float]] | None = None


@dataclass(frozen=True)
class ModelFile:
    spec: ModelSpec
    workload: Workload | None = None
    drafts: tuple[DraftCandidate, ...] = ()
    compensation: Compensation | None = None


_TOP_KEYS = ("model", "workload", "drafts", "quantization", "compensation")


def resolve_spec(ref: object, base: Path, where: str) -> ModelSpec:
    """A model reference: inline mapping, preset name, config.json / directory, or .gguf."""
    if isinstance(ref, dict):
        return from_dict(ModelSpec, ref, where, SpecError)
    if not isinstance(ref, str):
        raise SpecError(f"{where}: expected a mapping, a preset name or a path, got {ref!r}")
    path = (base / ref).expanduser() if not Path(ref).is_absolute() else Path(ref)
    if path.suffix == ".gguf" or path.suffix == ".json" or path.is_dir() or "/" in ref:
        return load_spec_file(path)
    return preset(ref)


def load_spec_file(path: Path) -> ModelSpec:
    if path.suffix == ".gguf":
        from planner.model.gguf_spec import spec_from_gguf
        return spec_from_gguf(path)
    from planner.model.hfconfig import load_hf_config
    return load_hf_config(path)


def load_model_file(source: str) -> ModelFile:
    """`source` is a model.yaml, config.json, model directory, .gguf file, or preset name."""
    path = Path(source).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        if path.exists() or "/" in source or path.suffix in (".json", ".gguf"):
            if not path.exists():
                raise SpecError(f"{path}: file not found")
            return ModelFile(load_spec_file(path))
        return ModelFile(preset(source))
    data = check_version(read_yaml(path, SpecError), str(path), MODEL_VERSION, SpecError)
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise SpecError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(_TOP_KEYS)}")
    if "model" not in data:
        raise SpecError(f"{path}: missing 'model:' (a mapping of the model's shape, a preset name, or a path)")
    try:
        spec = resolve_spec(data["model"], path.parent, "model")
        if data.get("quantization") is not None:
            spec = replace(spec, quantization=from_dict(Quantization, data["quantization"], "quantization", SpecError))
        workload = from_dict(Workload, data["workload"], "workload", SpecError) if "workload" in data else None
        drafts = tuple(_draft(d, i, path.parent) for i, d in enumerate(data.get("drafts") or []))
        compensation = (from_dict(Compensation, data["compensation"], "compensation", SpecError)
                        if data.get("compensation") is not None else None)
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return ModelFile(spec, workload, drafts, compensation)


def _draft(entry: object, index: int, base: Path) -> DraftCandidate:
    where = f"drafts[{index}]"
    if not isinstance(entry, dict) or "model" not in entry:
        raise SpecError(f"{where}: expected a mapping with 'model:' and 'acceptance:'")
    unknown = sorted(set(entry) - {"model", "acceptance", "name"})
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: model, acceptance, name")
    spec = resolve_spec(entry["model"], base, f"{where}.model")
    acceptance = entry.get("acceptance", "measure")
    if acceptance == "measure":
        value = None
    elif isinstance(acceptance, (int, float)) and not isinstance(acceptance, bool) and 0 <= acceptance <= 1:
        value = float(acceptance)
    else:
        raise SpecError(f"{where}.acceptance: must be a number between 0 and 1 or 'measure', got {acceptance!r}")
    return DraftCandidate(str(entry.get("name", spec.name)), spec, value)
