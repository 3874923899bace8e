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
    dst = home / "dagster.yaml"
    if src.exists() and not dst.exists():
        try:
            dst.symlink_to(os.path.relpath(src, home))
        except OSError:  # filesystems without symlinks
            shutil.copyfile(src, dst)
    os.environ["DAGSTER_HOME"] = str(home)  # must be absolute (Dagster refuses relative paths)
    return home
