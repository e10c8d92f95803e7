"""Score offplan's llama.cpp predictions against published measurements.

    python benchmarks/published.py            # every row, per-category medians, -ngl sweeps
    python benchmarks/published.py --fit      # refit LlamaCppFit on one half, report both halves

Each row of benchmarks/published/rows.yaml is mapped to a model shape, a llama.cpp file type,
a GPU profile and a host (benchmarks/published_map.py) and scored with the library's
`predict_llamacpp` on the row's flags: pp N from an empty cache (or, for rows measured at a
cache depth d, the time of tokens d..d+N), tg M after `depth` cached tokens. Error is
predicted / published - 1. Rows from ik_llama.cpp and KTransformers, whose kernels differ
from llama.cpp's, are scored too but kept out of the llama.cpp medians; rows whose hardware
the source does not state are used for sweep shapes only. Fitting (--fit) uses the rows at
even positions of the llama.cpp list and reports the odd ones as held out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from planner.cost.llamacpp import FIT, LlamaCppFit, LlamaCppSettings  # noqa: E402
from planner.cost.llamacpp_tensors import types_for_ftype  # noqa: E402
from planner.errors import OffplanError  # noqa: E402
from planner.model.spec import Workload  # noqa: E402
from planner.solve.llamacpp_predict import predict_llamacpp  # noqa: E402
from published_map import RowInput, row_input  # noqa: E402

ROWS = Path(__file__).resolve().parent / "published" / "rows.yaml"


@dataclass(frozen=True)
class Scored:
    row: dict
    inp: RowInput | None
    pp: float | None  # predicted tok/s
    tg: float | None
    fits: bool
    why: str  # why it was skipped, or ""

    @property
    def pp_err(self) -> float | None:
        return _err(self.pp, self.row.get("pp_tok_s"))

    @property
    def tg_err(self) -> float | None:
        return _err(self.tg, self.row.get("tg_tok_s"))

    @property
    def suspect(self) -> bool:
        """The collector's notes flag the row (likely paging, memory-constrained, outlier)."""
        notes = (self.row.get("notes") or "").lower()
        return "suspect" in notes or "outlier" in notes

    @property
    def in_medians(self) -> bool:
        return (self.inp is not None and self.inp.hardware_stated and self.row.get("runtime") == "llama.cpp"
                and not self.suspect)


def _err(predicted, published) -> float | None:
    if predicted is None or not published:
        return None
    return predicted / float(published) - 1.0


def _scenario_settings(fit: LlamaCppFit):
    return LlamaCppSettings()


def score(row: dict, fit: LlamaCppFit = FIT) -> Scored:
    inp = row_input(row)
    if isinstance(inp, str):
        return Scored(row, None, None, None, False, inp)
    types = types_for_ftype(inp.spec, inp.quant)
    pp = tg = None
    fits = True
    depth = int(row.get("depth") or 0)
    try:
        if row.get("pp_tok_s") and row.get("n_prompt"):
            n = int(row["n_prompt"])
            end = _predict(inp, types, Workload(1, depth + n, 1), fit)
            pp_s = end.prediction.prefill_s
            if depth:
                pp_s -= _predict(inp, types, Workload(1, depth, 1), fit).prediction.prefill_s
            pp, fits = n / pp_s, end.fits
        if row.get("tg_tok_s"):
            f = _predict(inp, types, Workload(1, max(depth, 1), int(row.get("n_gen") or 128)), fit)
            tg, fits = f.decode_tok_s, fits and f.fits
    except OffplanError as exc:
        return Scored(row, inp, None, None, False, f"flags: {exc}")
    return Scored(row, inp, pp, tg, fits, "")


def _predict(inp: RowInput, types, workload: Workload, fit: LlamaCppFit):
    forecast = predict_llamacpp(inp.spec, inp.profile, workload, inp.flags, types,
                                LlamaCppSettings(offload_large_batches=not inp.legacy, logits_all=inp.legacy))
    if fit is FIT:
        return forecast
    from planner.cost.llamacpp import evaluate_llamacpp
    scn = replace(forecast.scenario, fit=fit)
    return replace(forecast, scenario=scn, prediction=evaluate_llamacpp(scn, forecast.placement))


def load_rows() -> list[dict]:
    return yaml.safe_load(ROWS.read_text())["rows"]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.0%}"


def print_rows(scored: list[Scored]) -> None:
    print(f"{'row':44} {'cat':8} {'runtime':6} {'pp pub':>8} {'pp pred':>8} {'err':>6} "
          f"{'tg pub':>7} {'tg pred':>7} {'err':>6}")
    for s in scored:
        r = s.row
        if s.why:
            print(f"{r['id'][:44]:44} {r['category'][:8]:8} skipped: {s.why}")
            continue
        mark = "" if s.in_medians else (" (hardware not stated)" if not s.inp.hardware_stated
                                         else " (flagged suspect)" if s.suspect else "")
        print(f"{r['id'][:44]:44} {r['category'][:8]:8} {r['runtime'][:6]:6} "
              f"{_num(r.get('pp_tok_s')):>8} {_num(s.pp):>8} {_pct(s.pp_err):>6} "
              f"{_num(r.get('tg_tok_s')):>7} {_num(s.tg):>7} {_pct(s.tg_err):>6}"
              f"{'' if s.fits else ' (predicted not to fit)'}{mark}")


def _num(x) -> str:
    return "-" if x is None else f"{float(x):.1f}"


def medians(scored: list[Scored], title: str) -> None:
    print(f"\n{title}: median |error| (rows)")
    cats = sorted({s.row["category"] for s in scored})
    for cat in cats + ["all"]:
        rows = [s for s in scored if cat in ("all", s.row["category"])]
        tg = [abs(s.tg_err) for s in rows if s.tg_err is not None]
        pp = [abs(s.pp_err) for s in rows if s.pp_err is not None]
        print(f"  {cat:18} tg {_med(tg):>6} ({len(tg):2})   pp {_med(pp):>6} ({len(pp):2})")


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.0%}" if xs else "-"


def sweeps(scored: list[Scored]) -> None:
    """Rows of one machine and model differing only in -ngl: is the predicted order the
    published one, and is the curve's shape (ratios to the largest -ngl) the same?"""
    import re
    groups: dict[tuple, list[Scored]] = {}
    for s in scored:
        r = s.row
        if s.why or "-ngl" not in s.inp.flags.replace("--n-gpu-layers", "-ngl") or r["category"] not in ("partial-ngl", "all-gpu", "kv-host"):
            continue
        key = (r["source"], r["model"], r.get("quant"), r.get("gpu"), r.get("cpu"), r.get("depth"),
               r.get("n_prompt"), r.get("runtime"))
        groups.setdefault(key, []).append(s)
    print("\n-ngl sweeps: published vs predicted (tok/s, and as a share of the largest -ngl)")
    for key, rows in groups.items():
        ngls = {_ngl(s) for s in rows}
        if len(ngls) < 3:
            continue
        rows.sort(key=lambda s: (_ngl(s), "-nkvo" in s.inp.flags))
        print(f"  {rows[0].row['id'].rsplit('-ngl', 1)[0]} ({len(rows)} rows)")
        for metric in ("pp", "tg"):
            pub = [s.row.get(f"{metric}_tok_s") for s in rows]
            pred = [getattr(s, metric) for s in rows]
            if any(p is None for p in pub) or any(p is None for p in pred):
                continue
            order_ok = _order(pub) == _order(pred)
            top_pub, top_pred = pub[-1], pred[-1]
            shape = " ".join(f"{a / top_pub:.2f}/{b / top_pred:.2f}" for a, b in zip(pub, pred))
            print(f"    {metric}: order {'same' if order_ok else 'DIFFERENT'}; published/predicted share: {shape}")


def _ngl(s: Scored) -> int:
    import re
    found = re.search(r"(-ngl|--n-gpu-layers|--gpu-layers) (-?\d+)", s.inp.flags)
    return int(found.group(2)) if found else 0


def _order(xs: list[float]) -> list[int]:
    return sorted(range(len(xs)), key=lambda i: xs[i])


def objective(scored: list[Scored]) -> float:
    """Mean |log(predicted / published)| over every pp and tg figure: each row counts (a
    median over a dozen rows ignores half of them)."""
    errs = [abs(math.log(1 + e)) for s in scored for e in (s.pp_err, s.tg_err) if e is not None and e > -1]
    return statistics.fmean(errs) if errs else float("inf")


def fit_constants(rows: list[dict]) -> LlamaCppFit:
    """Search LlamaCppFit on `rows` for the smallest mean |log(predicted / published)|: the
    CPU prompt-processing pair jointly (dense and expert matmuls trade against each other),
    then the other constants one at a time, twice over."""
    pair = [(c, e) for c in (0.15, 0.25, 0.35, 0.5, 0.7) for e in (0.2, 0.3, 0.45, 0.6, 1.0)]
    grid = {"switch_s": [10e-6, 20e-6, 40e-6, 60e-6, 100e-6, 150e-6, 250e-6],
            "token_s": [0.0, 100e-6, 300e-6, 600e-6],
            "gpu_prefill_efficiency": [0.3, 0.45, 0.6, 0.8, 1.0, 1.2],
            "core_read_gbps": [12.0, 16.0, 20.0, 30.0, 50.0],
            "cpu_op_s": [0.0, 5e-6, 10e-6, 20e-6, 40e-6],
            "gpu_op_s": [0.0, 2e-6, 4e-6, 8e-6, 16e-6],
            "cpu_attention_efficiency": [0.05, 0.1, 0.2, 0.35, 0.6, 1.0],
            "cpu_read_efficiency": [0.6, 0.7, 0.8, 0.9, 1.0, 1.1]}
    fit = LlamaCppFit()
    best = objective([score(r, fit) for r in rows])
    for _round in range(2):
        for cpu_eff, expert_eff in pair:
            trial = replace(fit, cpu_prefill_efficiency=cpu_eff, cpu_expert_efficiency=expert_eff)
            obj = objective([score(r, trial) for r in rows])
            if obj < best - 1e-9:
                best, fit = obj, trial
        print(f"  cpu_prefill_efficiency = {fit.cpu_prefill_efficiency:g}, cpu_expert_efficiency = "
              f"{fit.cpu_expert_efficiency:g} (mean |log error| {best:.3f})", flush=True)
        for name, values in grid.items():
            for value in values:
                trial = replace(fit, **{name: value})
                obj = objective([score(r, trial) for r in rows])
                if obj < best - 1e-9:
                    best, fit = obj, trial
            print(f"  {name} = {getattr(fit, name):g} (mean |log error| {best:.3f})", flush=True)
    return fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit LlamaCppFit on the even rows")
    args = parser.parse_args()
    rows = load_rows()
    llama_rows = [r for r in rows if r.get("runtime") == "llama.cpp"]
    scorable = [r for r in llama_rows if score(r).in_medians]
    fit_half, held_out = scorable[0::2], scorable[1::2]
    fit = FIT
    if args.fit:
        print(f"fitting on {len(fit_half)} rows (even positions), holding out {len(held_out)}")
        fit = fit_constants(fit_half)
        print("fitted:", ", ".join(f"{f.name}={getattr(fit, f.name):g}" for f in fields(fit)))
    scored = [score(r, fit) for r in rows]
    print_rows(scored)
    by_id = {s.row["id"]: s for s in scored}
    medians([s for s in scored if s.in_medians], "llama.cpp rows with stated hardware")
    medians([by_id[r["id"]] for r in fit_half], "  fit half")
    medians([by_id[r["id"]] for r in held_out], "  held-out half")
    others = [s for s in scored if not s.why and s.row.get("runtime") != "llama.cpp"]
    medians(others, "other runtimes (ik_llama.cpp, KTransformers), same llama.cpp model")
    sweeps(scored)
    skipped = [s for s in scored if s.why]
    print(f"\n{len(scored) - len(skipped)} rows scored, {len(skipped)} skipped")


if __name__ == "__main__":
    main()
