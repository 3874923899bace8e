"""Where one experiment's files live (the one layout object every stage and analysis uses) and the readers of
its inputs: the preference table and the probe set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from ldpipe.errors import LdpipeError
from ldpipe.paths import Paths
from ldpipe.schema import PROBE_SCHEMA
from ldpipe.spec import ExperimentSpec, RunSpec

Log = Callable[[str], None]


# A run's directory, <models>/<exp>/runs/<run>/: the final checkpoint, model snapshots, resume checkpoints and
# earlier configurations' records. Every stage and analysis names these through here.
FINAL_DIR = "final"
SNAPSHOT_DIR = "checkpoints"   # model-only checkpoints step-NNNNNNN (RunSpec.snapshot_every)
RESUME_DIR = "resume"          # resume checkpoints of an unfinished run (ldpipe.training.resume)
ARCHIVE_DIR = "archive"        # archive/config_hash=<hash>/: an earlier configuration's checkpoints


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def snapshot_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / step_name(step)


@dataclass(frozen=True)
class ExperimentFiles:
    """Where one experiment's artifacts live."""

    paths: Paths
    name: str

    @property
    def data_dir(self) -> Path:
        return self.paths.datasets / self.name

    @property
    def preferences(self) -> Path:
        return self.data_dir / "preferences.parquet"

    @property
    def world(self) -> Path:
        return self.data_dir / "world"

    @property
    def probes(self) -> Path:
        return self.data_dir / "probes.parquet"

    @property
    def probe_report(self) -> Path:
        return self.data_dir / "probe_report.json"

    @property
    def model_probes(self) -> Path:   # model-made probe rows (y_init, y_selfr, random tokens)
        return self.data_dir / "model_probes.parquet"

    @property
    def model_probe_report(self) -> Path:
        return self.data_dir / "model_probe_report.json"

    def base_model(self, spec: ExperimentSpec) -> Path:
        # keyed by hash only, so experiments declaring the same data and model share one checkpoint
        return self.paths.models / f"base-{spec.model_config_hash()}"

    def run_dir(self, run: RunSpec) -> Path:
        return self.paths.models / self.name / "runs" / run.name

    def final_dir(self, run: RunSpec) -> Path:
        """The run's final checkpoint (a LoRA run's: its adapter)."""
        return self.run_dir(run) / FINAL_DIR

    def snapshots_dir(self, run: RunSpec) -> Path:
        return self.run_dir(run) / SNAPSHOT_DIR

    def resume_dir(self, run: RunSpec) -> Path:
        """Resume checkpoints of an unfinished run (ldpipe.training.resume; removed when the run finishes)."""
        return self.run_dir(run) / RESUME_DIR

    def snapshot_dir(self, run: RunSpec, step: int) -> Path:
        """The model-only checkpoint of `run` after `step` optimizer steps (RunSpec.snapshot_every)."""
        return snapshot_path(self.run_dir(run), step)

    def curves_png(self, run: RunSpec | None = None) -> Path:
        return self.paths.plots / f"{self.name}{'.' + run.name if run else ''}.learning_curves.png"


def files_for(spec: ExperimentSpec, paths: Paths | None = None) -> ExperimentFiles:
    return ExperimentFiles((paths or Paths.default()).ensure(), spec.name)



def load_preferences_file(files: ExperimentFiles) -> pl.DataFrame:
    if not files.preferences.exists():
        raise LdpipeError(f"{files.preferences} is missing: materialize the dataset first")
    return pl.read_parquet(files.preferences)



def _finish_stage(frames: list[pl.DataFrame]) -> pl.DataFrame:
    return (pl.concat(frames) if frames else pl.DataFrame(schema=PROBE_SCHEMA)).select(list(PROBE_SCHEMA)) \
        .sort("example_id", "response_type")



def load_probes_file(files: ExperimentFiles) -> pl.DataFrame:
    """The whole probe set: the probe-set stage's rows plus, once built, the model-made ones."""
    from ldpipe.hashing import file_hash

    if not files.probes.exists():
        raise LdpipeError(f"{files.probes} is missing: materialize the probe set first")
    probes = pl.read_parquet(files.probes)
    if not files.model_probes.exists():
        return probes
    report = json.loads(files.model_probe_report.read_text()) if files.model_probe_report.exists() else {}
    if report.get("probe_set_sha") != file_hash(files.probes):
        raise LdpipeError(f"{files.model_probes} was built from another version of {files.probes}: materialize "
                          f"{files.name}/model_probes again (or delete {files.model_probes})")
    both = _finish_stage([probes, pl.read_parquet(files.model_probes)])
    dup = both.select("example_id", "response_type").is_duplicated()
    if dup.any():
        i = int(dup.arg_true()[0])
        raise LdpipeError(f"{files.model_probes} repeats probe row ({both['example_id'][i]!r}, "
                          f"{both['response_type'][i]!r}) of {files.probes}")
    return both
