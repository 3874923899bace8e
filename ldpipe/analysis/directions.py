"""The paper's qualitative directions, measured on a run's probe trajectories (no Dagster needed).

Ren & Sutherland (ICLR 2025): SFT on y+ raises y+ and other prompts' answers y_j≠u (irr_train) and lowers
irrelevant human text y_hum (irr_hum) and word shuffles; off-policy DPO lowers y- fastest and nearly every other
type with it, while the argmax response y* (teacher-forced on y+) gains ("squeezing"); extend-SFT (SFT on y+ and
y-) before DPO shrinks DPO's collateral decline. Each check here reports the measured deltas whether it passes or
not: the thresholds are the paper's signs, never tuned to the data.

The squeezing check follows the reference implementation's committed DPO runs (Ren & Sutherland's repository,
exp_results): with the argmax bug fixed, Pythia-410M and Qwen1.5-0.5B DPO at lr 5e-7 moved y* by +20.4 and
+15.7 nats while y+ ended −4.2 and −27.1 below its start; other runs have y+ rising (Pythia-410M, +5.7) or
falling (Pythia-1B, −6.7). The invariant is that the argmax path gains and pulls away from y+, so the check asks
exactly that, and reports whether y+ fell as a separate measured number.

A delta is the change of the mean over probe prompts of log π(y|x) (sum over response tokens) between a run's
first evaluation (step 0, its start checkpoint) and its last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import polars as pl

from ldpipe.analysis.squeeze_stats import squeeze_diagnostics, start_end
from ldpipe.spec import EXTEND_SUPERVISE, ExperimentSpec, RunSpec
from ldpipe.store.shards import Store

SFT_RISE = ("chosen", "irr_train")
SFT_FALL = ("irr_hum", "random_permute", "random_nonhum")
NEARLY_ALL = 0.8   # "nearly every type falls": at least this share of the probe types ends below its start
SQUEEZE_DESCRIPTION = (
    "Measured (squeezing; definition from the reference implementation's fixed-code DPO runs, where y* rose "
    "+20.4 / +15.7 nats while y+ fell −4.2 / −27.1): over the {A} run, mean log π(y*) (the argmax path "
    "teacher-forced on y+) rises AND the mean gap log π(y*) − log π(y+) widens. Whether y+ falls is reported "
    "in the metadata (chosen_fell), not part of the pass condition; so are the per-token gap, the share of y+ "
    "positions that are the argmax, and the valley depth of y−.")


@dataclass(frozen=True)
class CheckOutcome:
    """One measured check: JSON-able metadata so it travels through Dagster Pipes unchanged."""

    name: str
    passed: bool
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------- which checks a run gets

def run_checks(run: RunSpec) -> list[tuple[str, str]]:
    """(name, description) of every measured (WARN) check a run asset reports; decided from the declaration."""
    if run.algo == "sft":
        out = [("sft_raises_supervised_target",
                f"Measured: does SFT raise log π of the supervised type(s) ({run.supervise}) on the probe prompts?")]
        if "chosen" in run.supervised_types:
            out.append(("sft_paper_directions",
                        "Measured (paper §3): SFT raises y+ (chosen) and y_j≠u (irr_train) and lowers y_hum "
                        "(irr_hum) and the word shuffles (random_permute, random_nonhum). Metadata: every delta."))
        return out
    a, A = run.algo, run.algo.upper()
    return [
        (f"{a}_widens_chosen_rejected_gap", f"Measured: does {A} raise log π(y+) − log π(y−) on the probe prompts?"),
        (f"{a}_rejected_falls_fastest", f"Measured (paper §4): under {A}, y- (rejected) has the largest decline "
                                        "of all probe types."),
        (f"{a}_nearly_every_type_falls", f"Measured (paper §4): under {A}, at least {NEARLY_ALL:.0%} of the probe "
                                         "types end below their start. Metadata: the share that fell."),
        (f"{a}_squeezing_argmax_rises", SQUEEZE_DESCRIPTION.format(A=A)),
    ]


# ---------------------------------------------------------------- measurements

def run_trajectory(store: Store, run_id: str, config_hash: str | None = None) -> pl.DataFrame:
    """A run's trajectory rows (only those of `config_hash` when given: stale shards never mix in)."""
    traj = store.read("trajectories", run_id=run_id)
    if config_hash is not None and not traj.is_empty():
        traj = traj.filter(pl.col("config_hash") == config_hash)
    return traj


def type_deltas(traj: pl.DataFrame) -> pl.DataFrame:
    """Per response type: mean log π at the run's first and last evaluation, their difference, and the same
    for the teacher-forced argmax y* (`argmax_start/end/delta`)."""
    if traj.is_empty():
        return pl.DataFrame(schema={"response_type": pl.String, "start": pl.Float64, "end": pl.Float64,
                                    "delta": pl.Float64, "argmax_start": pl.Float64, "argmax_end": pl.Float64,
                                    "argmax_delta": pl.Float64})
    first, last = traj["step"].min(), traj["step"].max()
    agg = lambda step, p: (traj.filter(pl.col("step") == step).group_by("response_type")  # noqa: E731
                           .agg(pl.col("logp_sum").mean().alias(f"{p}"),
                                pl.col("argmax_logp_sum").mean().alias(f"argmax_{p}")))
    return (agg(first, "start").join(agg(last, "end"), on="response_type")
            .with_columns((pl.col("end") - pl.col("start")).alias("delta"),
                          (pl.col("argmax_end") - pl.col("argmax_start")).alias("argmax_delta"))
            .select("response_type", "start", "end", "delta", "argmax_start", "argmax_end", "argmax_delta")
            .sort("response_type"))


def _deltas(d: pl.DataFrame, col: str = "delta") -> dict[str, float]:
    return {t: round(float(v), 4) for t, v in d.select("response_type", col).iter_rows() if v is not None}


def evaluate_run(run: RunSpec, traj: pl.DataFrame) -> list[CheckOutcome]:
    """Every check of `run_checks(run)`, measured on the run's trajectories (failed, with a reason, if empty)."""
    names = [n for n, _ in run_checks(run)]
    d = type_deltas(traj)
    if d.is_empty():
        return [CheckOutcome(n, False, {"reason": "no trajectories for this run"}) for n in names]
    deltas = _deltas(d)
    by_name = {
        "sft_raises_supervised_target": lambda: _target(run, deltas),
        "sft_paper_directions": lambda: _sft_directions(deltas),
        f"{run.algo}_widens_chosen_rejected_gap": lambda: _gap(deltas),
        f"{run.algo}_rejected_falls_fastest": lambda: _rejected_fastest(deltas),
        f"{run.algo}_nearly_every_type_falls": lambda: _nearly_all_fall(deltas),
        f"{run.algo}_squeezing_argmax_rises": lambda: _squeezing(d, traj),
    }
    return [CheckOutcome(n, *by_name[n]()) for n in names]


def _nan(x: float | None) -> float:
    return float("nan") if x is None else float(x)


def _target(run: RunSpec, deltas: dict[str, float]) -> tuple[bool, dict]:
    got = [deltas.get(t) for t in run.supervised_types]
    measured = min(got) if None not in got else None
    return measured is not None and measured > 0, {"measured_delta": _nan(measured), "response_type": run.supervise}


def _gap(deltas: dict[str, float]) -> tuple[bool, dict]:
    c, r = deltas.get("chosen"), deltas.get("rejected")
    measured = c - r if c is not None and r is not None else None
    return measured is not None and measured > 0, {"measured_delta": _nan(measured),
                                                   "response_type": "chosen - rejected"}


def _sft_directions(deltas: dict[str, float]) -> tuple[bool, dict]:
    expected = {**{t: "rise" for t in SFT_RISE}, **{t: "fall" for t in SFT_FALL}}
    present = {t: want for t, want in expected.items() if t in deltas}
    wrong = sorted(t for t, want in present.items() if (deltas[t] > 0) != (want == "rise"))
    meta = {f"delta_{t}": deltas[t] for t in present}
    meta.update({"expected": expected, "violations": wrong, "missing_types": sorted(set(expected) - set(present)),
                 "matched": f"{len(present) - len(wrong)}/{len(present)}", "delta_by_type": deltas})
    return bool(present) and not wrong, meta


def _rejected_fastest(deltas: dict[str, float]) -> tuple[bool, dict]:
    fastest = min(deltas, key=deltas.get)
    r = deltas.get("rejected")
    others = [v for t, v in deltas.items() if t != "rejected"]
    meta = {"delta_rejected": _nan(r), "fastest_type": fastest, "delta_fastest": deltas[fastest],
            "runner_up_delta": min(others) if others else float("nan"), "delta_by_type": deltas}
    return r is not None and fastest == "rejected" and r < 0, meta


def _nearly_all_fall(deltas: dict[str, float]) -> tuple[bool, dict]:
    fell = sorted(t for t, v in deltas.items() if v < 0)
    share = len(fell) / len(deltas)
    meta = {"share_fell": round(share, 4), "n_fell": len(fell), "n_types": len(deltas), "threshold": NEARLY_ALL,
            "rose": sorted(set(deltas) - set(fell)), "delta_by_type": deltas}
    return share >= NEARLY_ALL, meta


def _squeeze_deltas(d: pl.DataFrame) -> dict | None:
    """The chosen row of type_deltas as the squeeze: delta_argmax, delta_chosen and delta_gap (their difference;
    None without an argmax delta), unrounded, plus the argmax start/end; None without y+ rows."""
    row = d.filter(pl.col("response_type") == "chosen")
    if row.is_empty():
        return None
    r = row.row(0, named=True)
    a = r["argmax_delta"]
    return {"delta_argmax": a, "delta_chosen": r["delta"], "delta_gap": None if a is None else a - r["delta"],
            "argmax_start": r["argmax_start"], "argmax_end": r["argmax_end"]}


def _squeezing(d: pl.DataFrame, traj: pl.DataFrame) -> tuple[bool, dict]:
    s = _squeeze_deltas(d)
    if s is None:
        return False, {"reason": "the probe set has no 'chosen' (y+) rows"}
    meta = {k: round(_nan(s[k]), 4) for k in ("delta_argmax", "delta_gap", "delta_chosen", "argmax_start",
                                               "argmax_end")}
    meta["chosen_fell"] = bool(s["delta_chosen"] < 0)
    meta.update({k: v for k, v in start_end(squeeze_diagnostics(traj)).items() if v is not None})
    ok = s["delta_argmax"] is not None and s["delta_argmax"] > 0 and s["delta_gap"] > 0
    return ok, meta


# ---------------------------------------------------------------- plain-SFT vs extend-SFT before DPO

def _sft_passes(run: RunSpec | None) -> float:
    """Passes over the preference pairs an SFT run makes (extend-SFT sees each pair twice per epoch)."""
    if run is None or run.algo != "sft":
        return 0.0
    return run.epochs * (2 if run.supervise == EXTEND_SUPERVISE else 1)


def _parent_supervise(spec: ExperimentSpec, r: RunSpec) -> str | None:
    p = spec.parent(r)
    return p.supervise if p is not None and p.algo == "sft" else None


def collateral_pairs(spec: ExperimentSpec) -> list[tuple[RunSpec, RunSpec]]:
    """(DPO after plain SFT on y+, DPO after extend-SFT on y+ and y-) pairs of the same algo, from start_from
    chains. Each extend-DPO run is paired with one plain run: the same beta, lr and epochs if possible, then the
    parent SFT with the closest number of optimizer passes (the paper compares equal SFT budgets)."""
    prefs = [r for r in spec.runs if r.algo != "sft"]
    plain = [r for r in prefs if _parent_supervise(spec, r) == "chosen"]
    extend = [r for r in prefs if _parent_supervise(spec, r) == EXTEND_SUPERVISE]
    pairs = []
    for e in extend:
        same = [p for p in plain if p.algo == e.algo]
        same.sort(key=lambda p: ((p.beta, p.lr, p.epochs) != (e.beta, e.lr, e.epochs),
                                 abs(_sft_passes(spec.parent(p)) - _sft_passes(spec.parent(e)))))
        if same:
            pairs.append((same[0], e))
    return pairs


def sft_length_pairs(spec: ExperimentSpec) -> list[tuple[RunSpec, RunSpec]]:
    """(DPO after a shorter plain SFT, the same DPO after a longer one): pairs of preference runs with equal
    settings whose parents are plain SFT runs that differ only in their number of epochs."""
    def key(r: RunSpec, parent: RunSpec) -> tuple:
        return (r.algo, r.beta, r.lr, r.epochs, r.batch_size, r.label_smoothing, r.optimizer,
                parent.lr, parent.batch_size, parent.optimizer)

    plain = [(r, spec.parent(r)) for r in spec.runs if r.algo != "sft" and _parent_supervise(spec, r) == "chosen"]
    pairs = []
    for i, (a, pa) in enumerate(plain):
        for b, pb in plain[i + 1:]:
            if key(a, pa) == key(b, pb) and pa.epochs != pb.epochs:
                pairs.append((a, b) if pa.epochs < pb.epochs else (b, a))
    return pairs


def squeeze_summary(d: pl.DataFrame) -> dict[str, float]:
    """A DPO run's squeeze from its type_deltas: the changes of mean log π(y*) and log π(y+) and of their gap
    (empty when the run has no y+ rows)."""
    s = _squeeze_deltas(d)
    if s is None or s["delta_argmax"] is None:
        return {}
    return {k: round(s[k], 4) for k in ("delta_argmax", "delta_chosen", "delta_gap")}


# What the run-comparing squeeze checks expect of the second run of each pair, and why (fixed before any run).
SQUEEZE_COMPARISONS = {
    "longer_sft_squeezes_more": (
        "more", "Measured (Ren & Sutherland 2025: the squeezing effect is stronger the peakier the model, and longer "
                "SFT makes it peakier): DPO after the longer plain SFT widens the gap log π(y*) − log π(y+) more "
                "than the same DPO after the shorter SFT. Squeeze = change of that gap over the DPO run (nats)."),
    "extend_sft_squeezes_less": (
        "less", "Measured (Ren & Sutherland 2025, the extend method: SFT on y+ and y- lifts y- out of the valley, "
                "so DPO's negative gradient squeezes less): DPO after extend-SFT widens the gap log π(y*) − "
                "log π(y+) less than the same DPO after plain SFT. Squeeze = change of that gap over the DPO run."),
}


def compare_squeeze(name: str, pairs: list[tuple[str, dict[str, float], str, dict[str, float]]]) -> CheckOutcome:
    """`name` in SQUEEZE_COMPARISONS, over (first run, its squeeze_summary, second run, its squeeze_summary):
    passes when every pair's second run squeezes more (or less, as the check expects) than its first."""
    want = SQUEEZE_COMPARISONS[name][0]
    rows, ok = [], bool(pairs)
    for a, sa, b, sb in pairs:
        ga, gb = sa.get("delta_gap"), sb.get("delta_gap")
        holds = ga is not None and gb is not None and (gb > ga if want == "more" else gb < ga)
        rows.append({"first_run": a, "second_run": b, "expected": f"second squeezes {want}",
                     **{f"first_{k}": v for k, v in sa.items()}, **{f"second_{k}": v for k, v in sb.items()},
                     "holds": holds})
        ok = ok and holds
    meta: dict = {"pairs": rows}
    if len(rows) == 1:
        meta.update({k: v for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return CheckOutcome(name, ok, meta)


def nontarget_mean(deltas: dict[str, float]) -> float:
    """Mean delta over the types DPO does not train on (everything but chosen and rejected)."""
    vals = [v for t, v in deltas.items() if t not in ("chosen", "rejected")]
    return sum(vals) / len(vals) if vals else float("nan")


def compare_collateral(pairs: list[tuple[str, dict[str, float], str, dict[str, float]]]) -> CheckOutcome:
    """`extend_sft_reduces_collateral_decline`: for every (plain run, its deltas, extend run, its deltas), the
    DPO after extend-SFT loses less y+ and less on the mean over non-target types than the DPO after SFT."""
    rows, ok = [], bool(pairs)
    for plain, dp, ext, de in pairs:
        row = {"plain_run": plain, "extend_run": ext,
               "delta_chosen_plain": _nan(dp.get("chosen")), "delta_chosen_extend": _nan(de.get("chosen")),
               "nontarget_mean_plain": round(nontarget_mean(dp), 4),
               "nontarget_mean_extend": round(nontarget_mean(de), 4)}
        row["chosen_decline_smaller"] = row["delta_chosen_extend"] > row["delta_chosen_plain"]
        row["nontarget_decline_smaller"] = row["nontarget_mean_extend"] > row["nontarget_mean_plain"]
        ok = ok and row["chosen_decline_smaller"] and row["nontarget_decline_smaller"]
        rows.append(row)
    meta: dict = {"pairs": rows}
    if len(rows) == 1:
        meta.update({k: v for k, v in rows[0].items() if isinstance(v, float) and not math.isnan(v)})
    return CheckOutcome("extend_sft_reduces_collateral_decline", ok, meta)


@dataclass(frozen=True)
class DirectionsResult:
    verdicts: pl.DataFrame                      # one row per run check: run, check, passed, measured (JSON)
    deltas: dict[str, dict[str, float]]         # run -> response type -> mean change of log π over the run
    squeeze: dict[str, dict[str, float]]        # run -> squeeze summary (empty for a run without rows)
    comparisons: list[CheckOutcome]             # the across-run checks (extend-SFT, SFT length)


def paper_directions(spec: ExperimentSpec, store: Store) -> DirectionsResult:
    """The paper's directions measured on the stored trajectories: each run's own checks, and the comparisons
    between runs (extend-SFT against plain SFT before DPO; longer against shorter SFT) where the declaration has
    such pairs. Only each run's latest configuration's rows count (a rerun with another hash replaces them)."""
    import json

    rows, deltas, squeeze = [], {}, {}
    for run in spec.runs:
        traj = run_trajectory(store, spec.run_id(run))
        if not traj.is_empty():
            traj = traj.filter(traj["config_hash"] == traj.sort("step")["config_hash"][-1])
        d = type_deltas(traj)
        deltas[run.name] = {t: float(v) for t, v in d.select("response_type", "delta").iter_rows()}
        squeeze[run.name] = squeeze_summary(d)
        for c in evaluate_run(run, traj):
            rows.append({"run": run.name, "check": c.name, "passed": c.passed,
                         "measured": json.dumps({k: v for k, v in c.metadata.items() if isinstance(v, (int, float, str))})})
    comparisons = []
    pairs = collateral_pairs(spec)
    if pairs:
        comparisons.append(compare_collateral([(p.name, deltas[p.name], e.name, deltas[e.name]) for p, e in pairs
                                               if deltas[p.name] and deltas[e.name]]))
    for name, run_pairs in squeeze_comparisons(spec).items():
        if run_pairs:
            comparisons.append(compare_squeeze(name, [(a.name, squeeze[a.name], b.name, squeeze[b.name])
                                                      for a, b in run_pairs if squeeze[a.name] and squeeze[b.name]]))
    verdicts = pl.DataFrame(rows, schema={"run": pl.String, "check": pl.String, "passed": pl.Boolean,
                                          "measured": pl.String})
    return DirectionsResult(verdicts, deltas, squeeze, comparisons)


def squeeze_comparisons(spec: ExperimentSpec) -> dict[str, list[tuple[RunSpec, RunSpec]]]:
    """The squeeze comparisons the declaration supports: check name -> run pairs (empty when none)."""
    return {"longer_sft_squeezes_more": sft_length_pairs(spec), "extend_sft_squeezes_less": collateral_pairs(spec)}
