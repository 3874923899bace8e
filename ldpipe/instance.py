"""The Dagster instance of a project: DAGSTER_HOME=<project>/.dagster_home with the repo's dagster.yaml.

Without this, `dagster dev` keeps history in a temporary folder that is deleted on exit.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ldpipe.paths import project_dir


def ensure_dagster_home(project: Path | None = None) -> Path:
    project = (project or project_dir()).resolve()
    home = Path(os.environ.get("DAGSTER_HOME") or project / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    src = project / "dagster.yaml"
    if not src.exists():   # a user's own project: the settings ldpipe ships with (the gpu pool of limit 1)
        from ldpipe.paths import BUILTIN_SQL

        src = BUILTIN_SQL.parent / "dagster.yaml"
    dst = home / "dagster.yaml"
    if src.exists() and not dst.exists():
        try:
            dst.symlink_to(os.path.relpath(src, home))
        except OSError:  # filesystems without symlinks
            shutil.copyfile(src, dst)
    os.environ["DAGSTER_HOME"] = str(home)  # must be absolute (Dagster refuses relative paths)
    return home


def step_durations(instance, run_id: str) -> list[tuple[str, float]]:
    """(step key, seconds) of a run's finished steps, slowest first: where a run's time went."""
    out = [(s.step_key, float(s.end_time - s.start_time)) for s in instance.get_run_step_stats(run_id)
           if s.start_time is not None and s.end_time is not None]
    return sorted(out, key=lambda kv: -kv[1])


def latest_run_step_durations(dagster_home: Path) -> tuple[str, list[tuple[str, float]]] | None:
    """The newest run of the instance at `dagster_home` and its step durations (None without runs)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as instance:
        runs = instance.get_runs(limit=1)
        if not runs:
            return None
        return runs[0].run_id, step_durations(instance, runs[0].run_id)
