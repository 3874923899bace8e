"""The influence heat map: mean influence of an update on each trained-on response type (and the run's own preference
step, 'dpo') on every observed type, same prompt and other prompts, per checkpoint and accumulated; and its plot
(each block on its own colour scale)."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch

from ldpipe.analysis.checkpoints import Checkpoint
from ldpipe.analysis.plots import figure_png, subplots
from ldpipe.errors import LdpipeError
from ldpipe.influence.entk import per_sequence_gradients
from ldpipe.influence.inputs import observed_probes
from ldpipe.influence.runs import Log, Pair, _encode_observed, _RunContext, _threads
from ldpipe.schema import INFLUENCE_HEATMAP_SCHEMA
from ldpipe.spec import ExperimentSpec, RunSpec

# --------------------------------------------------------------------------- heat map

def compute_heatmap(spec: ExperimentSpec, run: RunSpec, files, *, device: str = "cpu",
                    log: Log = print) -> pl.DataFrame:
    """INFLUENCE_HEATMAP_SCHEMA rows from the eNTK of per-sequence gradients of each trained-on type.

    Updates: SFT on each trained-on type of each observed probe prompt (direction g(x_u, y_T)), and a
    DPO step on (chosen, rejected) of the prompt (beta of the run, margin against the run's start
    checkpoint). One gradient per probe sequence serves every column: K = G G^T.
    """
    with _threads(spec.influence.threads):
        return _compute_heatmap(spec, run, files, device=device, log=log)


def _compute_heatmap(spec, run, files, *, device, log):
    from ldpipe.model.scoring import batch_logps
    from ldpipe.training.losses import preference_coefficient

    ctx = _RunContext(spec, run, files, device)
    inf = ctx.inf
    probes = observed_probes(spec, files)  # every type: trained-on and observed types are subsets
    types = sorted(probes["response_type"].unique().to_list())
    trained = list(inf.heatmap_types or types)
    missing = sorted(set(trained) - set(types))
    if missing:
        raise LdpipeError(f"influence.heatmap_types {missing} are not in the probe set of {spec.name!r}")
    observed = list(inf.observed_types or types)
    has_dpo = {"chosen", "rejected"} <= set(types)
    ref = None
    per_ckpt = []
    for ckpt in ctx.checkpoints:
        model, tok = ctx.load(ckpt)
        pairs, labels = _encode_observed(tok, spec, probes)
        coef = None
        if has_dpo:
            idx = {lab: k for k, lab in enumerate(labels)}
            prompts = sorted({e for e, _ in labels})
            cr = [(pairs[idx[(e, "chosen")]], pairs[idx[(e, "rejected")]]) for e in prompts]
            with torch.no_grad():
                pol = torch.stack([batch_logps(model, [c, r])[0] for c, r in cr]).double()
            if ref is None:  # the run's start checkpoint is the reference
                ref_model = model if ckpt.label == "start" else ctx.load(Checkpoint(ctx.run_id, "start", 0, ctx.start_path))[0]
                with torch.no_grad():
                    ref = torch.stack([batch_logps(ref_model, [c, r])[0] for c, r in cr]).double()
            margin = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
            # the run's own preference loss (cDPO, IPO); an SFT run's column shows what a DPO step would do
            c = preference_coefficient(margin, run.beta, algo=run.algo, label_smoothing=run.label_smoothing)
            coef = {e: float(c[k]) for k, e in enumerate(prompts)}
        eta = ctx.lr_eff[ckpt.step]
        cells = heatmap_cells(model, pairs, labels, trained=trained, observed=observed, dpo_coef=coef)
        for cell in cells:
            per_ckpt.append({"run_id": ctx.run_id, "checkpoint": ckpt.label, "checkpoint_step": ckpt.step, **cell,
                             "value": eta * cell["entk_mean"]})
        n_dirs = sum(1 for e, t in labels if t in trained) + (len(coef) if coef else 0)
        log(f"[{ctx.run_id}] heat map at {ckpt.label}: {n_dirs} updates x {len(pairs)} probes")
        del model
    df = pl.DataFrame(per_ckpt, schema=INFLUENCE_HEATMAP_SCHEMA)
    total = (df.group_by("run_id", "trained_type", "observed_type", "scope")
             .agg(pl.col("value").sum(), pl.col("n").first())
             .with_columns(pl.lit("accumulated").alias("checkpoint"), pl.lit(None, pl.Int64).alias("checkpoint_step"),
                           pl.lit(None, pl.Float64).alias("entk_mean")))
    return pl.concat([df, total.select(list(INFLUENCE_HEATMAP_SCHEMA))]).sort(
        "run_id", "checkpoint_step", "trained_type", "observed_type", "scope", nulls_last=True)


def heatmap_cells(model, pairs: list[Pair], labels: list[tuple[str, str]], *, trained: list[str],
                  observed: list[str], dpo_coef: dict[str, float] | None = None) -> list[dict]:
    """The heat map's cells at one checkpoint: for every (trained_type, observed_type, scope) the mean eNTK
    (entk_mean) over the n (update, observed) pairs, as dicts with those keys.

    `pairs[k]` is the probe sequence labelled `labels[k]` = (example_id, response_type). Updates: SFT on each
    trained-on type of each prompt (direction g(x_u, y_T)) and, where `dpo_coef` gives a prompt its preference
    coefficient c, the step c * (g(x_u, y+) - g(x_u, y-)) (trained_type "dpo"). One gradient per probe sequence
    serves every column: K = G G^T.
    """
    idx = {lab: k for k, lab in enumerate(labels)}
    G = per_sequence_gradients(model, pairs)
    gram = (G @ G.T).double().cpu()
    del G
    dirs: dict[tuple[str, str], torch.Tensor] = {}
    for e in sorted({e for e, _ in labels}):
        for t in trained:
            if (e, t) in idx:
                dirs[(e, t)] = gram[idx[(e, t)]]
    for e, c in (dpo_coef or {}).items():
        dirs[(e, "dpo")] = c * (gram[idx[(e, "chosen")]] - gram[idx[(e, "rejected")]])
    acc: dict[tuple[str, str, str], list[float]] = {}
    for (e, t), row in dirs.items():
        for (eo, to), j in idx.items():
            if to in observed:
                scope = "same_prompt" if eo == e else "other_prompt"
                acc.setdefault((t, to, scope), []).append(float(row[j]))
    return [{"trained_type": t, "observed_type": to, "scope": scope, "entk_mean": float(np.mean(vals)),
             "n": len(vals)} for (t, to, scope), vals in acc.items()]


def _colour_limit(mat: np.ndarray) -> tuple[float, int]:
    """(limit, saturated cells): the 90th percentile of |value|, so a few huge cells (e.g. random tokens on
    themselves) do not wash out every other cell; larger cells saturate (the table has the numbers)."""
    finite = np.abs(mat[np.isfinite(mat)])
    lim = float(np.percentile(finite, 90)) if finite.size else 1.0
    return lim, int((finite > lim).sum()) if finite.size else 0


def heatmap_blocks(df: pl.DataFrame, checkpoint: str = "accumulated") -> list[dict]:
    """The heat map's panels: per scope, the SFT columns as one block and the DPO column as a block of its own
    (its values are orders of magnitude smaller: β(1−σ) scales its update, so on a shared colour scale it
    would look empty). Each block: scope, kind ("sft" | "dpo"), rows, cols, matrix, limit, saturated."""
    part = df.filter(pl.col("checkpoint") == checkpoint)
    if part.is_empty():
        raise LdpipeError(f"plot_heatmap: no rows for checkpoint {checkpoint!r}")
    trained = set(part["trained_type"].to_list())
    groups = [("sft", sorted(t for t in trained if t != "dpo")), ("dpo", ["dpo"] if "dpo" in trained else [])]
    rows_ = sorted(part["observed_type"].unique().to_list())
    blocks = []
    for scope in (s for s in ("same_prompt", "other_prompt") if s in part["scope"].to_list()):
        cells = part.filter(pl.col("scope") == scope).select("trained_type", "observed_type", "value").rows()
        for kind, cols in groups:
            if not cols:
                continue
            mat = np.full((len(rows_), len(cols)), np.nan)
            for t, o, v in cells:
                if t in cols:
                    mat[rows_.index(o), cols.index(t)] = v
            lim, saturated = _colour_limit(mat)
            blocks.append({"scope": scope, "kind": kind, "rows": rows_, "cols": cols, "matrix": mat, "limit": lim,
                           "saturated": saturated})
    return blocks


def plot_heatmap(df: pl.DataFrame, *, title: str, checkpoint: str = "accumulated") -> bytes:
    """PNG: rows observed types, columns trained-on types; per scope the SFT columns and, beside them, the DPO
    column on its own colour scale (heatmap_blocks); diverging colours centred at 0."""
    from matplotlib.colors import TwoSlopeNorm

    blocks = heatmap_blocks(df, checkpoint)
    widths = [len(b["cols"]) for b in blocks]
    n_rows = len(blocks[0]["rows"])
    fig, axes = subplots(1, len(blocks), figsize=(2.0 + 0.55 * sum(widths) + 1.6 * len(blocks), 0.4 * n_rows + 2.8),
                         squeeze=False, gridspec_kw={"width_ratios": [max(w, 1.6) for w in widths]})
    for ax, b in zip(axes[0], blocks):
        lim, mat = b["limit"], b["matrix"]
        im = ax.imshow(np.clip(mat, -lim, lim) if lim > 0 else mat, cmap="RdBu_r",
                       norm=TwoSlopeNorm(0.0, -lim or -1.0, lim or 1.0), aspect="auto")
        ax.set_xticks(range(len(b["cols"])), b["cols"], rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(n_rows), b["rows"] if ax is axes[0][0] else [""] * n_rows, fontsize=7)
        what = "SFT on each type" if b["kind"] == "sft" else "DPO (own scale)"
        sat = f"\n{b['saturated']} cells beyond ±{lim:.3g} saturate" if b["saturated"] else ""
        ax.set_title(f"{b['scope'].replace('_', ' ')}: {what}\ncolour limit ±{lim:.3g}{sat}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.08 if b["kind"] == "dpo" else 0.046,
                     extend="both" if b["saturated"] else "neither",
                     label="Δ log π (nats, per update)" if b["kind"] == "sft" else None)
    axes[0][0].set_ylabel("observed response type")
    fig.suptitle(title + " (the DPO column has its own colour scale)", fontsize=10)
    return figure_png(fig)
