"""`ldpipe run` as a user types it, killed and interrupted: a kill -9 must not wedge the next run on the `gpu` pool,
and SIGTERM/SIGINT end it within seconds (143/130), freeing its claims and leaving no process behind."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, wait_until

LDPIPE = str(Path(sys.executable).parent / "ldpipe")
LONG = "influence: {enabled: false}\ngeneration_analysis: {enabled: false}\n"


def _project(tiny_project: Path) -> dict[str, str]:
    decl = tiny_project / "assets" / "tiny.yaml"   # long enough to still be training when the signal comes
    decl.write_text(decl.read_text().replace("epochs: 1,", "epochs: 4000,") + LONG)
    shutil.copy(REPO / "dagster.yaml", tiny_project / "dagster.yaml")   # the gpu pool, limit 1
    env = {**os.environ, "DAGSTER_HOME": str(tiny_project / ".dagster_home"), "LDPIPE_THREADS": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([LDPIPE, "run", "--device", "cpu", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _workers() -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"ldpipe.training.worker" in (d / "cmdline").read_bytes() and \
                        (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _training(home: Path) -> bool:
    shards = home / "store" / "trajectories" / "run_id=tiny.sft"
    return shards.is_dir() and any(shards.glob("*.parquet"))


def _start_training(env: dict[str, str], home: Path, log: Path) -> subprocess.Popen:
    """`ldpipe run` of the long declaration, returned once it is training (its first trajectory shard exists)."""
    proc = _start([], env, log)
    try:
        wait_until(lambda: _training(home) or proc.poll() is not None, 240, "the run to train")
        assert proc.poll() is None, log.read_text()[-3000:]
    except BaseException:
        _reap(proc)
        raise
    return proc


def _reap(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)
    for w in _workers():
        os.kill(w, signal.SIGKILL)


def _instance_state(dagster_home: Path) -> tuple[list[str], list]:
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home))) as inst:
        active = [r.run_id for r in inst.get_runs() if r.status.name in ("STARTED", "STARTING", "NOT_STARTED")]
        return active, inst.event_log_storage.get_concurrency_info("gpu").claimed_slots


@pytest.mark.slow
def test_a_killed_run_does_not_wedge_the_next_one(tiny_project):
    """The reproduction of issue 15: kill -9 `ldpipe run` mid-training, then run again."""
    env = _project(tiny_project)
    home = tiny_project / ".ldpipe"
    first = _start_training(env, home, tiny_project / "first.log")
    second = None
    try:
        os.killpg(first.pid, signal.SIGKILL)             # the launching process and whatever shares its group
        first.wait(timeout=30)
        wait_until(lambda: not _workers(), 60, "the orphaned worker to stop by itself")
        second = _start(["--preset", "smoke"], env, tiny_project / "second.log")
        second.wait(timeout=300)                         # wedged before: waited forever on the gpu pool
        out = (tiny_project / "second.log").read_text()
        assert second.returncode == 0, out[-3000:]
        assert "was still STARTED but its process (pid" in out and "freed its pool claims" in out
    finally:
        _reap(first, *([second] if second else []))
    active, claimed = _instance_state(tiny_project / ".dagster_home")
    assert active == [] and claimed == []


@pytest.mark.slow
def test_sigterm_while_waiting_for_the_pool_and_sigint_while_training(tiny_project):
    env = _project(tiny_project)
    home = tiny_project / ".ldpipe"
    a = _start_training(env, home, tiny_project / "a.log")
    b = None
    try:
        b = _start(["--preset", "smoke"], env, tiny_project / "b.log")
        wait_until(lambda: "waits for pool 'gpu'" in (tiny_project / "b.log").read_text() or b.poll() is not None, 180,
              "run B to say it waits for the gpu pool")
        out_b = (tiny_project / "b.log").read_text()
        assert b.poll() is None and "held by run" in out_b, out_b[-3000:]
        t0 = time.monotonic()
        b.send_signal(signal.SIGTERM)
        b.wait(timeout=60)
        assert b.returncode == 143 and time.monotonic() - t0 < 20
        assert "marked failed (stopped by SIGTERM); its pool claims are freed" in (tiny_project / "b.log").read_text()
        assert a.poll() is None                           # A keeps training

        worker = _workers()
        assert worker, "run A's training worker"
        t0 = time.monotonic()
        a.send_signal(signal.SIGINT)
        a.wait(timeout=60)
        out_a = (tiny_project / "a.log").read_text()
        assert a.returncode == 130 and time.monotonic() - t0 < 30, out_a[-3000:]
        assert "ldpipe: SIGINT: stopping the run" in out_a
        wait_until(lambda: not _workers(), 30, "no worker left")
    finally:
        _reap(a, *([b] if b else []))
    active, claimed = _instance_state(tiny_project / ".dagster_home")
    assert active == [] and claimed == []


def test_recover_dead_runs_marks_them_failed_and_frees_their_claims(tmp_path):
    """What `ldpipe run` and `ldpipe ui` do at start, on a run left STARTED by a process that is gone, next to
    one whose process is alive (this one)."""
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef
    from dagster._core.storage.dagster_run import DagsterRun

    from ldpipe.runguard import TAG_PID, my_tags, recover_dead_runs

    (tmp_path / "dagster.yaml").write_text((REPO / "dagster.yaml").read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=60).stdout.strip()
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(tmp_path))) as inst:
        storage = inst.event_log_storage
        storage.set_concurrency_slots("gpu", 1)
        runs = {"dead": DagsterRun(job_name="j", run_id="a" * 32, status=dg.DagsterRunStatus.STARTED,
                                   tags={TAG_PID: dead}),
                "alive": DagsterRun(job_name="j", run_id="b" * 32, status=dg.DagsterRunStatus.STARTED,
                                    tags=my_tags("x"))}
        for r in runs.values():
            inst.run_storage.add_run(r)
        assert storage.claim_concurrency_slot("gpu", runs["dead"].run_id, "train").is_claimed
        assert not storage.claim_concurrency_slot("gpu", runs["alive"].run_id, "train").is_claimed   # waits
        lines: list[str] = []
        assert recover_dead_runs(inst, log=lines.append) == [runs["dead"].run_id]
        assert inst.get_run_by_id(runs["dead"].run_id).status == dg.DagsterRunStatus.FAILURE
        assert inst.get_run_by_id(runs["alive"].run_id).status == dg.DagsterRunStatus.STARTED
        assert [c.run_id for c in storage.get_concurrency_info("gpu").claimed_slots] == []
        assert len(lines) == 1 and f"(pid {dead}) is gone" in lines[0]
        assert storage.claim_concurrency_slot("gpu", runs["alive"].run_id, "train").is_claimed   # unblocked
