"""Learning curves per response type: EMA smoothing as in the paper, and a PNG plot."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from ldpipe.analysis.plots import figure_png, subplots

# Colour families of the paper's figures: chosen* blue, rejected* orange, irr* red, random* cyan.
_FAMILY_COLOURS = {"chosen": "tab:blue", "reject": "tab:orange", "irr": "tab:red", "random": "tab:cyan"}


def ema(values: list[float], alpha: float = 0.9) -> list[float]:
    """s_t = alpha * s_{t-1} + (1 - alpha) * x_t, started at x_0 (the paper's smoothing, alpha 0.9)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * out[-1] + (1 - alpha) * v)
    return out


def _colour(response_type: str) -> str:
    for prefix, colour in _FAMILY_COLOURS.items():
        if response_type.startswith(prefix):
            return colour
    return "tab:gray"


def plot_learning_curves(curves: pl.DataFrame, *, title: str, value: str = "mean_delta",
                         smooth: float | None = None, boundaries: dict[int, str] | None = None) -> bytes:
    """PNG bytes: one line per response type of `value` against step (curves from sql/learning_curves.sql);
    `boundaries`: step -> label of a phase that starts there (chained runs on one axis)."""
    fig, ax = subplots(figsize=(8, 4.8))
    styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for (rtype,), part in curves.sort("step").group_by(["response_type"], maintain_order=True):
        part = part.sort("step")
        ys = part[value].to_list()
        if smooth:
            ys = ema(ys, smooth)
        colour = _colour(rtype)
        k = seen.get(colour, 0)
        seen[colour] = k + 1
        ax.plot(part["step"].to_list(), ys, styles[k % len(styles)], color=colour, label=rtype, linewidth=1.6)
    ax.axhline(0.0, color="black", linewidth=0.5)
    for x, label in (boundaries or {}).items():
        ax.axvline(x, color="gray", linestyle="--", linewidth=0.8)
        ax.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, ha="left", va="top")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("change of log π(y|x) since step 0 (nats)" if value == "mean_delta" else value)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="best")
    return figure_png(fig)


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
