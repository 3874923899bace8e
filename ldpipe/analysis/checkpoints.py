"""Which checkpoints of a run the generation-based analyses look at, and how a checkpoint is named.

A run's checkpoints, in step order: `start` (the base model, or the parent run's `final`; step 0),
snapshots `runs/<run>/checkpoints/step-XXXXXXX` when the training wrote any (step = the number), and
`final` (step = the run's optimizer steps). Steps are the run's own (local) steps, as in `trajectories`.

A checkpoint reference (win-rate pairs) is "base", "<run>" (its final), "<run>@start" or "<run>@step-XXXXXXX".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ldpipe.errors import LdpipeError
from ldpipe.spec import ExperimentSpec, RunSpec

_SNAPSHOT = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    run_id: str          # "<exp>.<run>", or "<exp>.base" for the base model
    label: str           # "start" | "step-XXXXXXX" | "final" | "base"
    step: int            # the run's local optimizer steps done at this checkpoint
    path: Path | str     # a local directory, or a hub id for a pretrained base model


def _complete(path: Path) -> bool:
    from ldpipe.model.checkpoints import is_checkpoint

    return is_checkpoint(path)


def run_checkpoints(spec: ExperimentSpec, run: RunSpec, files, *, snapshots: bool = True) -> list[Checkpoint]:
    """start, snapshots (if any and asked for, in step order) and final of one run: the one listing every analysis
    uses; fails naming the run if it is not trained."""
    from ldpipe.model.checkpoints import read_metadata
    from ldpipe.training.runs import start_point

    rid = spec.run_id(run)
    final = files.final_dir(run)
    if not _complete(final):
        raise LdpipeError(f"run {rid}: no final checkpoint at {final}: materialize {spec.name}/run_{run.name} first")
    out = [Checkpoint(rid, "start", 0, start_point(spec, run, files).path)]
    snap_dir = files.snapshots_dir(run)
    if snapshots and snap_dir.is_dir():
        found = [(int(m.group(1)), p) for p in snap_dir.iterdir()
                 if (m := _SNAPSHOT.match(p.name)) and p.is_dir() and _complete(p)]
        out += [Checkpoint(rid, p.name, n, p) for n, p in sorted(found)]
    steps = int(read_metadata(final).get("steps", out[-1].step))
    out.append(Checkpoint(rid, "final", steps, final))
    return out


def resolve_ref(spec: ExperimentSpec, ref: str, files) -> Checkpoint:
    """A checkpoint reference ("base", "<run>", "<run>@start", "<run>@step-XXXXXXX") -> Checkpoint."""
    from ldpipe.model.base import base_model_path

    if ref == "base":
        return Checkpoint(f"{spec.name}.base", "base", 0, base_model_path(spec, files))
    name, _, label = ref.partition("@")
    run = spec.run(name)
    label = label or "final"
    for c in run_checkpoints(spec, run, files):
        if c.label == label:
            return c
    raise LdpipeError(f"checkpoint reference {ref!r}: run {name!r} has no checkpoint {label!r}; "
                      f"have {[c.label for c in run_checkpoints(spec, run, files)]}")

