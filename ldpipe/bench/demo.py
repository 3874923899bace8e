"""`ldpipe bench demo`: the full default pipeline (`ldpipe run`) from an empty ldpipe home, in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ldpipe.bench.common import Timer


def bench_demo(*, quick: bool = False, threads: int | None = None, experiment: str = "default",
               keep_home: str | None = None) -> dict:
    """`keep_home`: run into this (new or empty) ldpipe home and keep it, e.g. to query the results after."""
    from ldpipe.paths import project_dir

    if keep_home and Path(keep_home).exists() and any(Path(keep_home).iterdir()):
        from ldpipe.errors import LdpipeError

        raise LdpipeError(f"--keep-home {keep_home} is not empty: the demo starts from an empty ldpipe home")
    with tempfile.TemporaryDirectory(prefix="ldpipe-bench-demo-") as tmp:
        home = Path(keep_home).resolve() if keep_home else Path(tmp) / "home"
        env = {**os.environ, "LDPIPE_HOME": str(home), "DAGSTER_HOME": str(Path(tmp) / "dagster"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        Path(env["DAGSTER_HOME"]).mkdir()
        cmd = [sys.executable, "-m", "ldpipe.cli", "run", "-e", experiment, "--device", "cpu"]
        with Timer() as t:
            proc = subprocess.run(cmd, cwd=project_dir(), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            from ldpipe.errors import LdpipeError

            raise LdpipeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        from ldpipe.instance import latest_run_step_durations

        latest = latest_run_step_durations(Path(env["DAGSTER_HOME"]))
    steps = latest[1] if latest else []
    goal_s = 300.0
    return {
        "benchmark": "demo",
        "title": f"`ldpipe run -e {experiment}` from an empty ldpipe home (tokenizer, pretraining, every run, "
                 "catalog, analyses)",
        "context": {"experiment": experiment, "project": str(project_dir()), "home": str(keep_home or "(temporary)"),
                    "stdout_tail": proc.stdout[-1500:], "step_seconds": dict(steps)},
        "columns": ["method", "seconds", "share_of_goal"],
        "results": [{"method": f"ldpipe run -e {experiment}", "seconds": t.seconds,
                     "share_of_goal": t.seconds / goal_s}]
                   # where the time went: the slowest steps (`ldpipe run` executes one step at a time)
                   + [{"method": f"  step {k}", "seconds": v, "share_of_goal": v / goal_s} for k, v in steps[:12]],
        "goal": "<= 5 minutes on a 2-core CPU",
        "goal_met": t.seconds <= goal_s,
        "notes": "share_of_goal = seconds / 300; includes Python start-up and Dagster's in-process run. Step rows: "
                 "the 12 slowest steps of the run from Dagster's event log (all in context.step_seconds).",
    }
