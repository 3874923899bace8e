import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Nothing in the test suite may reach a model or dataset hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# A suite started from a script's background job (CI runners, `nohup ... &`) inherits SIGINT ignored. Dagster's
# in-process execution then sets SIGTERM to whatever SIGINT is (dagster._utils.interrupts.setup_interrupt_handlers),
# so every process a later test starts would ignore SIGTERM too (a `dg dev` that needs SIGKILL, a process group that
# outlives its SIGTERM). The tests stop and interrupt processes as from a terminal: SIGINT as Python sets it there.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# A tiny experiment: same code paths as the default, sized to run in seconds on 2 CPU cores.
TINY_YAML = """
name: tiny
dataset:
  kind: synthetic
  synthetic: {seed: 1, n_entities: 16, n_train: 32, n_test: 8, corpus_docs: 200}
probes: {n_examples: 6, selection: random, seed: 0, max_prompt_tokens: 48, max_response_tokens: 40}
model:
  kind: builtin
  vocab_size: 400
  architecture: {hidden_size: 32, num_layers: 2, num_heads: 2, intermediate_size: 64}
  pretrain: {steps: 15, batch_size: 8, seq_len: 64, lr: 3.0e-3, warmup: 3}
runs:
  - {name: sft, algo: sft, epochs: 1, batch_size: 8, lr: 2.0e-3, eval_every: 2}
"""


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    """A project dir with one tiny declaration, the repo's sql/, and its own ldpipe home."""
    proj = tmp_path / "proj"
    (proj / "assets").mkdir(parents=True)
    (proj / "assets" / "tiny.yaml").write_text(TINY_YAML)
    (proj / "sql").symlink_to(REPO / "sql")
    monkeypatch.setenv("LDPIPE_PROJECT_DIR", str(proj))
    monkeypatch.setenv("LDPIPE_HOME", str(proj / ".ldpipe"))
    monkeypatch.delenv("LDPIPE_ASSETS_DIR", raising=False)
    return proj


@pytest.fixture(scope="module")
def one_thread():
    """LDPIPE_THREADS=1 for a module's training (2 by default; other jobs share the cores), for module-scoped
    fixtures, which cannot use the function-scoped `monkeypatch`."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LDPIPE_THREADS", "1")
    yield
    mp.undo()


def build_inputs(spec, home: Path):
    """Dataset, probe set and base model of `spec` under the ldpipe home `home` (quietly, on CPU)."""
    from ldpipe import pipeline
    from ldpipe.paths import Paths

    files = pipeline.files_for(spec, Paths(home))
    quiet = lambda msg: None  # noqa: E731
    pipeline.build_dataset(spec, files, log=quiet)
    pipeline.build_probes(spec, files, log=quiet)
    pipeline.build_base_model(spec, files, device="cpu", log=quiet)
    return files


@pytest.fixture
def server():
    """A local fake OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py), stopped after the test."""
    from fake_openai import FakeOpenAI

    with FakeOpenAI() as srv:
        yield srv


def wait_until(cond, timeout_s: float, what: str) -> None:
    """Poll `cond()` until it is true; fail naming `what` after `timeout_s` (every wait in a test is bounded)."""
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.2)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid`, read from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                state, _ppid, pgrp = (d / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):
                continue   # exited while we read
            if int(pgrp) == pgid and state not in ("Z", "X"):
                out.append(int(d.name))
    return out


def _wait_group(pgid: int, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass   # already gone


def stop_process_group(pgid: int, what: str, *, grace_s: float = 30.0, kill_wait_s: float = 30.0,
                       reap: subprocess.Popen | None = None) -> dict:
    """Stop process group `pgid` (a process started in a group of its own: start_new_session=True, or a
    background job of `bash -c 'set -m; ...'`), every wait bounded:

    SIGTERM to the group and up to `grace_s` for all of it to exit; what is left then gets SIGKILL (the whole
    group) and up to `kill_wait_s` more. A graceful exit slower than `grace_s` is not a failure (a loaded machine
    can take that long to shut a server down) but is reported: a warning in pytest's summary naming `what`, the
    processes still running at the grace period's end, and how long the exit took. Fails only when a process
    of the group outlives SIGKILL. `reap`: the Popen that leads the group or waits for its leader (e.g. the bash
    wrapper), waited for last (bounded too) so that it leaves no zombie. Returns {"killed": whether SIGKILL was
    needed, "exit_s": seconds from SIGTERM until the group was gone}."""
    start = time.monotonic()
    _signal_group(pgid, signal.SIGTERM)
    killed = not _wait_group(pgid, grace_s)
    if killed:
        left = group_members(pgid)
        _signal_group(pgid, signal.SIGKILL)
        if not _wait_group(pgid, kill_wait_s):
            raise AssertionError(f"{what}: process group {pgid} outlived SIGTERM ({grace_s}s) and SIGKILL "
                                 f"({kill_wait_s}s); still running: {group_members(pgid)}")
    exit_s = time.monotonic() - start
    if killed:
        msg = (f"{what}: not gone {grace_s}s after SIGTERM (still running then: {left}); SIGKILL to process group "
               f"{pgid} ended it, {exit_s:.1f}s after the SIGTERM")
        print(msg)
        warnings.warn(msg, stacklevel=2)
    if reap is not None:
        try:
            reap.wait(timeout=kill_wait_s)
        except subprocess.TimeoutExpired:
            reap.kill()
            reap.wait(timeout=kill_wait_s)
            raise AssertionError(f"{what}: pid {reap.pid} still running {kill_wait_s}s after its process group "
                                 f"{pgid} was gone") from None
    return {"killed": killed, "exit_s": exit_s}
