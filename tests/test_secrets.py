"""Promise 7: an API key comes only from the environment and never lands in logs, asset metadata, Parquet, the
DuckDB catalog, the LLM cache, the Dagster event log or the run's stdout/stderr.

`ldpipe run` (a subprocess, as a user starts it) builds a tiny project whose probe set uses an OpenAI-compatible
endpoint: a real HTTP server on 127.0.0.1 (tests/fake_openai.py). Afterwards every file under the project
(the ldpipe home and the Dagster home with its event log) and the captured output are searched for the key.
"""
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from conftest import TINY_YAML
from fake_openai import FakeOpenAI, Fault

LDPIPE = str(Path(sys.executable).parent / "ldpipe")
REPO = Path(__file__).resolve().parents[1]
KEY_ENV = "LDPIPE_TEST_SECRET_KEY"
SECRET = "sk-ldpipe-SECRET-7f3a9c1e5b2d4f60"     # distinctive: any hit is a leak


def _project(tmp_path: Path, base_url: str, *, runs: bool = True) -> Path:
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "sql").symlink_to(REPO / "sql")
    llm = (f"  llm: {{model: fake-model, base_url: '{base_url}', api_key_env: {KEY_ENV}, concurrency: 2, "
           f"max_attempts: 3, timeout_s: 5, types: [chosen_gptsemantic, irr_hum]}}\n")
    yaml = TINY_YAML.replace("probes: {n_examples: 6, selection: random, seed: 0, max_prompt_tokens: 48, "
                             "max_response_tokens: 40}\n",
                             "probes:\n  n_examples: 6\n  max_prompt_tokens: 48\n  max_response_tokens: 40\n" + llm)
    assert llm in yaml
    if not runs:
        yaml = yaml[: yaml.index("runs:")]
    (proj / "assets" / "tiny.yaml").write_text(yaml)
    return proj


def _ldpipe_run(proj: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}   # the project's own .dagster_home
    env.update({KEY_ENV: SECRET, "LDPIPE_PROJECT_DIR": str(proj), "LDPIPE_HOME": str(proj / ".ldpipe"),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    return subprocess.run([LDPIPE, "run", "--device", "cpu"], capture_output=True, text=True, cwd=proj, env=env,
                          timeout=600)


def _leaks(proj: Path, r: subprocess.CompletedProcess) -> list[str]:
    where = [name for name, text in (("stdout", r.stdout), ("stderr", r.stderr)) if SECRET in text]
    needle = SECRET.encode()
    for f in proj.rglob("*"):
        if f.is_file() and not f.is_symlink() and needle in f.read_bytes():
            where.append(str(f.relative_to(proj)))
    return where


def _searched(proj: Path) -> set[str]:
    """Which kinds of file the search covered (so a test cannot pass by searching nothing)."""
    kinds = set()
    for f in proj.rglob("*"):
        if f.is_file():
            kinds.add(f.suffix or f.name)
    return kinds


def _metadata_text(proj: Path) -> str:
    instance = dg.DagsterInstance.from_config(str(proj / ".dagster_home"))
    try:
        records = instance.fetch_materializations(dg.AssetKey(["tiny", "probe_set"]), limit=10).records
        assert records, "no probe_set materialization in the event log"
        return "\n".join(repr(rec.asset_materialization.metadata) for rec in records)
    finally:
        instance.dispose()


def test_key_never_leaves_the_environment_on_a_successful_run(tmp_path):
    with FakeOpenAI() as srv:
        srv.fail_request(2, Fault("500"))              # a retry, so a warning with the error text is logged
        proj = _project(tmp_path, srv.base_url)
        r = _ldpipe_run(proj)
        auth = set(srv.auth_headers)
    assert r.returncode == 0, r.stderr[-3000:]
    assert auth == {f"Bearer {SECRET}"}                # the key really was sent to the endpoint
    home = proj / ".ldpipe"
    probes = pl.read_parquet(home / "datasets" / "tiny" / "probes.parquet")
    assert probes.filter(pl.col("provenance").str.starts_with("llm:fake-model")).height == 12
    assert (home / "llm_cache.sqlite").is_file() and (home / "catalog.duckdb").is_file()
    assert list((home / "store" / "trajectories").rglob("*.parquet"))
    assert {".parquet", ".duckdb", ".sqlite", ".db"} <= _searched(proj)   # store, catalog, cache, event log
    meta = _metadata_text(proj)
    assert "calls" in meta and SECRET not in meta      # the LLM call stats are there; the key is not
    assert _leaks(proj, r) == []


def test_key_never_leaves_the_environment_when_the_endpoint_echoes_it(tmp_path):
    """A careless server echoes the key in a 401 error: the step fails, and the error shown is redacted."""
    with FakeOpenAI() as srv:
        srv.fail_prompt("Reference sentence", forever=Fault("401"))
        proj = _project(tmp_path, srv.base_url, runs=False)
        r = _ldpipe_run(proj)
    assert r.returncode == 1
    assert "probe_set" in r.stderr and "***" in r.stdout + r.stderr       # the redacted echo is shown
    assert not (proj / ".ldpipe" / "datasets" / "tiny" / "probes.parquet").exists()
    assert _leaks(proj, r) == []


@pytest.mark.parametrize("key", ["api_key", "openai_api_key", "key"])
def test_a_key_written_into_the_yaml_is_refused_without_echoing_it(tmp_path, key):
    """Keys come from the environment only: a declaration holding one is an error, and the error hides the value."""
    (tmp_path / "x.yaml").write_text(f"name: x\nprobes:\n  llm: {{model: m, {key}: {SECRET}}}\n")
    r = subprocess.run([LDPIPE, "check", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"probes.llm.{key}" in r.stderr and "unknown key" in r.stderr
    assert SECRET not in r.stdout + r.stderr
