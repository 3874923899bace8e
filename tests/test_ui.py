"""The Dagster UI is ldpipe's web page: start `dg dev` on 127.0.0.1, read the asset graph over GraphQL,
launch a materialization through it, and stop its process group (SIGTERM, then SIGKILL if it hangs)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import stop_process_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gql(port: int, query: str, variables: dict | None = None, timeout: float = 10) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    assert "errors" not in out, out
    return out["data"]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


ASSET_NODES = "{ assetNodes { assetKey { path } groupName pools dependencyKeys { path } } }"
LAUNCH = """
mutation($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}"""
RUN = "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"


@pytest.mark.ui
@pytest.mark.slow
def test_dg_dev_graph_and_launch(tiny_project, tmp_path):
    port = _free_port()
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "LDPIPE_ASSETS_DIR": str(tiny_project / "assets")}
    log = tmp_path / "dg.log"
    pidfile = tmp_path / "dg.pid"
    # `set -m` gives the background job its own process group with default signal handling;
    # without it dagster ignores SIGTERM and its children outlive it.
    script = (f"set -m; dg dev -h 127.0.0.1 -p {port} > '{log}' 2>&1 & echo $! > '{pidfile}'; wait")
    wrapper = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=env)
    pid = None
    try:
        deadline = time.time() + 180
        nodes = None
        while time.time() < deadline:
            if pid is None and pidfile.exists() and pidfile.read_text().strip():
                pid = int(pidfile.read_text())
            try:
                nodes = _gql(port, ASSET_NODES)["assetNodes"]
                if nodes:
                    break
            except (OSError, AssertionError):
                pass
            assert wrapper.poll() is None, f"dg dev exited early:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        assert nodes, f"UI did not come up:\n{log.read_text()[-3000:]}"
        by_key = {"/".join(n["assetKey"]["path"]): n for n in nodes}
        assert {"tiny/dataset", "tiny/probe_set", "tiny/base_model", "tiny/run_sft", "catalog",
                "tiny/learning_curves"} <= set(by_key)
        assert by_key["tiny/run_sft"]["pools"] == ["gpu"]
        assert ["tiny", "probe_set"] in [d["path"] for d in by_key["tiny/run_sft"]["dependencyKeys"]]

        params = {"selector": {"repositoryLocationName": "ldpipe", "repositoryName": "__repository__",
                               "pipelineName": "__ASSET_JOB",
                               "assetSelection": [{"path": ["tiny", "dataset"]}]},
                  "mode": "default", "runConfigData": {}}
        launched = _gql(port, LAUNCH, {"params": params})["launchPipelineExecution"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status = None
        while time.time() < deadline:
            status = _gql(port, RUN, {"id": run_id})["runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(1)
        assert status == "SUCCESS", f"run {run_id} ended {status}:\n{log.read_text()[-3000:]}"
        assert (tiny_project / ".ldpipe" / "datasets" / "tiny" / "preferences.parquet").exists()
        # run history is in DAGSTER_HOME, so it survives a restart of the UI
        assert any((dagster_home / "storage").iterdir())
    finally:
        if pid is None and pidfile.exists() and pidfile.read_text().strip():
            pid = int(pidfile.read_text())    # written after the last look
        if pid is not None:
            # SIGTERM to dg dev's process group, SIGKILL to what is left after the grace period (a warning says
            # so and how long it took); fails only if something of the group outlives SIGKILL
            stopped = stop_process_group(pid, "dg dev", grace_s=60, reap=wrapper)
            print(f"dg dev stopped: SIGKILL needed {stopped['killed']}, {stopped['exit_s']:.1f}s after SIGTERM")
        else:
            wrapper.kill()
            wrapper.wait(timeout=30)
    for _ in range(30):
        if not _port_open(port):
            break
        time.sleep(0.5)
    assert not _port_open(port), "the webserver outlived dg dev"


@pytest.mark.ui
@pytest.mark.slow
def test_ldpipe_ui_in_a_users_own_project(tmp_path):
    """`ldpipe ui` where the project is only assets/ and a data file (no pyproject, no dg.toml): the UI comes up
    with that project's asset graph (through `dagster dev -m ldpipe.definitions`)."""
    proj = tmp_path / "mine"
    (proj / "assets").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "own_data" / "qa.jsonl", proj / "qa.jsonl")
    shutil.copy(REPO / "examples" / "own_data" / "assets" / "own_qa.yaml", proj / "assets" / "own_qa.yaml")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LDPIPE_", "DAGSTER_"))}
    log, pidfile = tmp_path / "ui.log", tmp_path / "ui.pid"
    script = f"set -m; '{BIN / 'ldpipe'}' ui --port {port} > '{log}' 2>&1 & echo $! > '{pidfile}'; wait"
    wrapper = subprocess.Popen(["bash", "-c", script], cwd=proj, env=env)
    pid = None
    try:
        deadline, nodes = time.time() + 180, None
        while time.time() < deadline and not nodes:
            if pid is None and pidfile.exists() and pidfile.read_text().strip():
                pid = int(pidfile.read_text())
            try:
                nodes = _gql(port, ASSET_NODES)["assetNodes"]
            except (OSError, AssertionError):
                assert wrapper.poll() is None, f"ldpipe ui exited early:\n{log.read_text()[-3000:]}"
                time.sleep(1)
        assert nodes, f"UI did not come up:\n{log.read_text()[-3000:]}"
        keys = {"/".join(n["assetKey"]["path"]) for n in nodes}
        assert {"own_qa/dataset", "own_qa/base_model", "own_qa/run_sft", "own_qa/run_dpo"} <= keys
        assert not any(k.startswith("default/") for k in keys)    # the project's declarations, not ldpipe's
        assert (proj / ".dagster_home" / "dagster.yaml").exists()
    finally:
        if pid is None and pidfile.exists() and pidfile.read_text().strip():
            pid = int(pidfile.read_text())
        if pid is not None:
            stop_process_group(pid, "ldpipe ui", grace_s=60, reap=wrapper)
        else:
            wrapper.kill()
            wrapper.wait(timeout=30)
