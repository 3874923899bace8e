"""`ldpipe bench demo`: the full default pipeline (`ldpipe run`) from an empty ldpipe home, in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ldpipe.bench.common import Timer


def bench_demo(*, quick: bool = False, threads: int | None = None, experiment: str = "default") -> dict:
    from ldpipe.paths import project_dir

    with tempfile.TemporaryDirectory(prefix="ldpipe-bench-demo-") as tmp:
        env = {**os.environ, "LDPIPE_HOME": str(Path(tmp) / "home"), "DAGSTER_HOME": str(Path(tmp) / "dagster"),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        Path(env["DAGSTER_HOME"]).mkdir()
        cmd = [sys.executable, "-m", "ldpipe.cli", "run", "-e", experiment, "--device", "cpu"]
        with Timer() as t:
            proc = subprocess.run(cmd, cwd=project_dir(), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            from ldpipe.errors import LdpipeError

            raise LdpipeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    goal_s = 300.0
    return {
        "benchmark": "demo",
        "title": f"`ldpipe run -e {experiment}` from an empty ldpipe home (tokenizer, pretraining, every run, "
                 "catalog, analyses)",
        "context": {"experiment": experiment, "project": str(project_dir())},
        "columns": ["method", "seconds", "share_of_goal"],
        "results": [{"method": f"ldpipe run -e {experiment}", "seconds": t.seconds,
                     "share_of_goal": t.seconds / goal_s}],
        "goal": "<= 5 minutes on a 2-core CPU",
        "goal_met": t.seconds <= goal_s,
        "notes": "share_of_goal = seconds / 300; includes Python start-up and Dagster's in-process run.",
    }
