"""Learning curves per response type: EMA smoothing as in the paper, and a PNG plot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ldpipe.analysis.plots import figure_png, subplots
from ldpipe.schema import CORE_RESPONSE_TYPES

# Colour families of the paper's figures: chosen* blue, rejected* orange, irr* red, random* cyan; within a family
# the line style (and, for the base model's own replies, a darker blue) tells the types apart. Every core type has
# its own (colour, line style) pair, fixed, so a type looks the same in every plot whatever else is plotted.
CORE_STYLES: dict[str, tuple[str, str]] = {
    "chosen": ("tab:blue", "-"),
    "chosen_gptsemantic": ("tab:blue", "--"),
    "chosen_gptformat": ("tab:blue", ":"),
    "chosen_initial": ("tab:blue", "-."),
    "chosen_selfr": ("navy", "--"),
    "rejected": ("tab:orange", "-"),
    "reject_gptsemantic": ("tab:orange", "--"),
    "reject_gptformat": ("tab:orange", ":"),
    "irr_train": ("tab:red", "-"),
    "irr_test": ("tab:red", "--"),
    "irr_hum": ("tab:red", ":"),
    "random_permute": ("tab:cyan", "-"),
    "random_nonhum": ("tab:cyan", "--"),
    "random_tokens": ("tab:cyan", ":"),
}
# Other (user-declared) types: colours outside the core families, each with every line style, colours first, so
# the first six get six colours and up to 24 get distinct pairs; beyond that the pairs repeat.
_EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:gray")
_LINE_STYLES = ("-", "--", ":", "-.")
EXTRA_STYLES: tuple[tuple[str, str], ...] = tuple((c, ls) for ls in _LINE_STYLES for c in _EXTRA_COLOURS)


def ema(values: list[float], alpha: float = 0.9) -> list[float]:
    """s_t = alpha * s_{t-1} + (1 - alpha) * x_t, started at x_0 (the paper's smoothing, alpha 0.9)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * out[-1] + (1 - alpha) * v)
    return out


def response_styles(response_types) -> dict[str, tuple[str, str]]:
    """(colour, line style) per response type, in legend order: the core types in CORE_RESPONSE_TYPES order with
    their fixed CORE_STYLES, then the other types sorted by name, taking EXTRA_STYLES in turn."""
    types = set(response_types)
    out = {t: CORE_STYLES[t] for t in CORE_RESPONSE_TYPES if t in types}
    for i, t in enumerate(sorted(types - set(CORE_RESPONSE_TYPES))):
        out[t] = EXTRA_STYLES[i % len(EXTRA_STYLES)]
    return out


def learning_curves_figure(curves: pl.DataFrame, *, title: str, value: str = "mean_delta",
                           smooth: float | None = None, boundaries: dict[int, str] | None = None):
    """The matplotlib figure of plot_learning_curves, not yet laid out (plots.layout_figure) nor closed."""
    fig, ax = subplots(figsize=(8, 4.8))
    styles = response_styles(curves["response_type"].drop_nulls().unique().to_list())
    for rtype, (colour, style) in styles.items():
        part = curves.filter(pl.col("response_type") == rtype).sort("step")
        ys = part[value].to_list()
        if smooth:
            ys = ema(ys, smooth)
        ax.plot(part["step"].to_list(), ys, linestyle=style, color=colour, label=rtype, linewidth=1.6)
    ax.axhline(0.0, color="black", linewidth=0.5)
    for x, label in (boundaries or {}).items():
        ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
        # above the data area, under the title (which is raised to make room), clear of the lines and the legend
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, 2), textcoords="offset points",
                    fontsize=7, ha="left", va="bottom")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("change of log π(y|x) since step 0 (nats)" if value == "mean_delta" else value)
    ax.set_title(title, pad=18 if boundaries else 6)
    # outside the axes on the right: it can hide neither a curve nor a phase label (a second column past 25 types)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              ncol=1 + (len(styles) - 1) // 25 if styles else 1)
    return fig


def plot_learning_curves(curves: pl.DataFrame, *, title: str, value: str = "mean_delta",
                         smooth: float | None = None, boundaries: dict[int, str] | None = None) -> bytes:
    """PNG bytes: one line per response type of `value` against step (curves from sql/learning_curves.sql), each
    type in its own colour and line style (response_styles); `boundaries`: step -> label of a phase that starts
    there (chained runs on one axis)."""
    return figure_png(learning_curves_figure(curves, title=title, value=value, smooth=smooth,
                                             boundaries=boundaries))


def save_plot(png: bytes, path: Path) -> Path:
    from ldpipe.atomic import write_bytes

    return write_bytes(png, path)


def chain_curves(curves: pl.DataFrame, chain: list[tuple[str, str]]) -> tuple[pl.DataFrame, dict[int, str]]:
    """Runs of one chain (e.g. SFT then DPO) on one step axis.

    `chain`: (run_id, label) from the first run to the last; `curves`: rows of sql/learning_curves.sql. Each
    run's steps are shifted by the steps of the runs before it; `mean_delta` becomes the change since the FIRST
    run's first evaluation, so the curve is continuous across phases. Returns the frame and the boundaries.
    """
    parts, boundaries, offset, base = [], {}, 0, None
    for i, (run_id, label) in enumerate(chain):
        part = curves.filter(pl.col("run_id") == run_id)
        if part.is_empty():
            raise ValueError(f"chain_curves: no learning-curve rows for run {run_id!r}")
        if base is None:
            first = part.filter(pl.col("step") == part["step"].min())
            base = first.select("response_type", pl.col("mean_logp").alias("base_logp"))
        boundaries[offset] = label
        parts.append(part.with_columns((pl.col("step") + offset).alias("step")))
        offset += int(part["step"].max())
    out = (pl.concat(parts, how="diagonal_relaxed").join(base, on="response_type", how="inner")
           .with_columns((pl.col("mean_logp") - pl.col("base_logp")).alias("mean_delta")).drop("base_logp"))
    return out.sort("step", "response_type"), boundaries


@dataclass(frozen=True)
class CurvesResult:
    curves: pl.DataFrame            # the learning_curves view's rows of the experiment's runs
    plots: dict[str, Path]          # run -> its curves PNG
    chain_plots: dict[str, Path]    # chained run -> the PNG of its whole chain on one step axis


def learning_curves(spec, files, log=print) -> CurvesResult:
    """The learning-curves step: each run's curves (and each chain's, on one axis) from the catalog, plotted."""
    from ldpipe.store.catalog import query_runs

    curves = query_runs(files.paths.catalog, "learning_curves", [spec.run_id(r) for r in spec.runs])
    pngs, chains = {}, {}
    smooth = spec.curves.ema
    note = f" (EMA {smooth})" if smooth else ""
    for run in spec.runs:
        part = curves.filter(pl.col("run_id") == spec.run_id(run))
        if part.is_empty():
            continue
        png = plot_learning_curves(part, title=f"{spec.run_id(run)}: change of log π(y|x) per response type{note}",
                                   smooth=smooth)
        pngs[run.name] = Path(save_plot(png, files.curves_png(run)))
        if run.start_from is None:
            continue
        # a chained run: every phase (e.g. SFT then DPO) on one axis, from the first run's first evaluation
        chain, r = [], run
        while r is not None:
            chain.insert(0, (spec.run_id(r), f"{r.name} ({r.algo})"))
            r = spec.parent(r)
        if all(not curves.filter(pl.col("run_id") == c).is_empty() for c, _ in chain):
            joined, bounds = chain_curves(curves, chain)
            png = plot_learning_curves(joined, title=f"{' → '.join(c for _, c in chain)}: change of log π(y|x) "
                                                     f"since the first phase{note}", smooth=smooth, boundaries=bounds)
            chains[run.name] = Path(save_plot(png, files.paths.plots / f"{spec.name}.{run.name}.chain.png"))
    log(f"[{spec.name}] learning curves: {curves.height} rows, plots "
        f"{[str(p) for p in [*pngs.values(), *chains.values()]]}")
    return CurvesResult(curves, pngs, chains)

