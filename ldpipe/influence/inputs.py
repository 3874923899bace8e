"""What an influence analysis looks at: the runs and their checkpoints (start, snapshots, final), the step sizes (lr x
clip factor), the training examples (units) and the observed probes."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import polars as pl

from ldpipe.analysis.checkpoints import Checkpoint
from ldpipe.analysis.checkpoints import run_checkpoints as all_checkpoints
from ldpipe.errors import LdpipeError
from ldpipe.spec import EXTEND_SUPERVISE, ExperimentSpec, InfluenceSpec, RunSpec

# --------------------------------------------------------------------------- what to analyse

def influence_runs(spec: ExperimentSpec) -> list[RunSpec]:
    """The runs the influence section selects (none when disabled)."""
    inf = spec.influence
    if not inf.enabled:
        return []
    return [r for r in spec.runs if inf.runs is None or r.name in inf.runs]


def run_checkpoints(spec: ExperimentSpec, run: RunSpec, files, inf: InfluenceSpec | None = None) -> list[Checkpoint]:
    """The checkpoints `influence.checkpoints` asks for, out of the run's (analysis.checkpoints.run_checkpoints):
    start, at most `max_snapshots` snapshots strictly between start and final (evenly thinned, the last kept),
    final."""
    inf = inf or spec.influence
    every = all_checkpoints(spec, run, files, snapshots="snapshots" in inf.checkpoints and inf.max_snapshots > 0)
    final = every[-1]
    snaps = [c for c in every[1:-1] if 0 < c.step < final.step]
    if len(snaps) > inf.max_snapshots:  # evenly thinned, always keeping the last
        idx = np.linspace(len(snaps) - 1, 0, inf.max_snapshots).round().astype(int)
        snaps = [snaps[i] for i in sorted(set(idx.tolist()))]
    return ([every[0]] if "start" in inf.checkpoints else []) + snaps + ([final] if "final" in inf.checkpoints else [])


def step_scales(spec: ExperimentSpec, run: RunSpec, files, steps: list[int]) -> dict[int, float]:
    """lr_eff per checkpoint step: lr * clip_factor / batch_size of the step taken FROM that checkpoint."""
    return {s: lr * clip / run.batch_size for s, (lr, clip) in step_factors(spec, run, files, steps).items()}


def step_factors(spec: ExperimentSpec, run: RunSpec, files, steps: list[int]) -> dict[int, tuple[float, float]]:
    """(lr_t, clip_t) per checkpoint step: of the step taken FROM that checkpoint (the last step for final)."""
    from ldpipe.store.shards import Store

    metrics = Store(files.paths.store).read("train_metrics", run_id=spec.run_id(run))
    out = {}
    for s in steps:
        if metrics.is_empty():
            lr, clip = run.lr, 1.0  # no metrics recorded: the declared peak lr, unclipped
        else:
            after = metrics.filter(pl.col("step") == s + 1)
            row = (after if not after.is_empty() else metrics.sort("step").tail(1)).row(0, named=True)
            lr, clip = float(row["lr"]), float(row["clip_factor"])
        out[s] = (lr, clip)
    return out


@dataclass(frozen=True)
class Unit:
    """One training example of a run (DPO/IPO: `response` is y+, `rejected` y-)."""
    example_id: str
    response_type: str
    prompt: str
    response: str
    rejected: str | None = None


def training_units(spec: ExperimentSpec, run: RunSpec, files) -> list[Unit]:
    """The run's training examples with ids, as pipeline._training_examples forms them."""
    from ldpipe.data.selection import training_rows
    from ldpipe.layout import load_preferences_file, load_probes_file

    train = training_rows(load_preferences_file(files), run)
    rows = train.select("example_id", "prompt", "chosen", "rejected").rows()
    if run.algo != "sft":
        return [Unit(e, run.algo, p, c, r) for e, p, c, r in rows]
    if run.supervise == EXTEND_SUPERVISE:
        return [u for e, p, c, r in rows for u in (Unit(e, "chosen", p, c), Unit(e, "rejected", p, r))]
    if run.supervise in ("chosen", "rejected"):
        col = 2 if run.supervise == "chosen" else 3
        return [Unit(row[0], run.supervise, row[1], row[col]) for row in rows]
    sel = load_probes_file(files).filter(pl.col("response_type") == run.supervise)
    return [Unit(e, run.supervise, p, y) for e, p, y in sel.select("example_id", "prompt", "response").rows()]


def observed_probes(spec: ExperimentSpec, files, inf: InfluenceSpec | None = None,
                    types: tuple[str, ...] | None = None) -> pl.DataFrame:
    """Probe rows of `n_probe_prompts` seeded-random probe prompts (every type, or `types`)."""
    from ldpipe.layout import load_probes_file

    inf = inf or spec.influence
    probes = load_probes_file(files)
    ids = sorted(probes["example_id"].unique().to_list())
    ids = sorted(random.Random(inf.seed).sample(ids, min(inf.n_probe_prompts, len(ids))))
    out = probes.filter(pl.col("example_id").is_in(ids))
    if types:
        missing = sorted(set(types) - set(out["response_type"].unique().to_list()))
        if missing:
            raise LdpipeError(f"influence: response type(s) {missing} are not in the probe set of {spec.name!r}")
        out = out.filter(pl.col("response_type").is_in(list(types)))
    return out.sort("example_id", "response_type")


def select_units(units: list[Unit], prefer_ids: list[str], n: int, seed: int) -> list[Unit]:
    """`n` units: those on the observed prompts first (so self-influence is in the matrix), then seeded random."""
    first = [u for u in units if u.example_id in set(prefer_ids)]
    rest = [u for u in units if u.example_id not in set(prefer_ids)]
    random.Random(seed).shuffle(rest)
    return (first + rest)[:n]
